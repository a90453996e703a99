"""A Flask app with no Procfile: DevFlow's default web process serves it with gunicorn."""
import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "flask v1"


@app.get("/env/<name>")
def env(name: str) -> str:
    return os.environ.get(name, "")
