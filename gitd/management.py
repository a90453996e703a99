"""Management operations as one user sees them: the same calls serve SSH commands and the REST API."""

from __future__ import annotations

from datetime import timedelta

from gitd.apps import AppRegistry
from gitd.deploy_management import DeployManagement, DeployServices, pipeline_errors
from gitd.errors import Forbidden, InvalidInput
from gitd.identity.directory import Directory, now
from gitd.identity.roles import Actor, Role

APP_SETTINGS = ("protected-branches", "deploy-branch")


class Management(DeployManagement):
    """Every method checks the actor's rights before it acts."""

    def __init__(self, directory: Directory, apps: AppRegistry, actor: Actor, deploys: DeployServices) -> None:
        self.directory = directory
        self.apps = apps
        self.actor = actor
        self.deploys = deploys

    def _self_or_admin(self, user: str | None, what: str) -> str:
        target = user or self.actor.name
        if target != self.actor.name and not self.actor.is_admin:
            raise Forbidden(f"only an admin can {what} for another user")
        return target

    def _require_admin(self, what: str) -> None:
        if not self.actor.is_admin:
            raise Forbidden(f"only an admin can {what}")

    def whoami(self) -> dict:
        return {**self.directory.user(self.actor.name), "via": self.actor.via}

    # apps

    def apps_list(self) -> list[dict]:
        return self.apps.list(self.actor)

    def apps_create(self, name: str) -> dict:
        return self.apps.create(self.actor, name)

    def apps_info(self, name: str) -> dict:
        return {**self.apps.info(self.actor, name), **self.deploy_info(name, self.apps.role(self.actor, name))}

    def apps_destroy(self, name: str) -> dict:
        self.apps.authorize(self.actor, name, Role.ADMIN)
        self.deploys.run(self.deploys.deployments.destroy(name))
        return self.apps.destroy(self.actor, name)

    def apps_set(self, name: str, setting: str, value: str) -> dict:
        if setting == "protected-branches":
            return self.apps.set_protected_branches(self.actor, name, value.replace(",", " ").split())
        if setting == "deploy-branch":
            self.apps.authorize(self.actor, name, Role.ADMIN)
            with pipeline_errors():
                branch = self.deploys.deployments.settings.set_deploy_branch(name, value.strip())
                return {"app": name, "deploy_branch": branch}
        raise InvalidInput(f"unknown app setting {setting!r}; settable: {', '.join(APP_SETTINGS)}")

    # keys

    def keys_add(self, key_text: str, user: str | None = None) -> dict:
        target = self._self_or_admin(user, "add keys")
        return self.directory.add_key(target, key_text, create_user=self.actor.is_admin)

    def keys_list(self, user: str | None = None) -> list[dict]:
        if user is None and self.actor.is_admin:
            return self.directory.list_keys()
        return self.directory.list_keys(self._self_or_admin(user, "list keys"))

    def keys_remove(self, fingerprint: str) -> dict:
        self._self_or_admin(self.directory.key_owner(fingerprint), "remove keys")
        return self.directory.remove_key(fingerprint)

    # tokens

    def tokens_create(self, user: str | None = None, description: str = "", expires_days: int | None = None) -> dict:
        target = self._self_or_admin(user, "create tokens")
        if expires_days is not None and expires_days <= 0:
            raise InvalidInput("--expires-days must be a positive number of days")
        expires = now() + timedelta(days=expires_days) if expires_days else None
        return self.directory.create_token(target, description, expires)

    def tokens_list(self, user: str | None = None) -> list[dict]:
        if user is None and self.actor.is_admin:
            return self.directory.list_tokens()
        return self.directory.list_tokens(self._self_or_admin(user, "list tokens"))

    def tokens_revoke(self, token_id: int) -> dict:
        self._self_or_admin(self.directory.token_owner(token_id), "revoke tokens")
        return self.directory.revoke_token(token_id)

    # collaborators

    def collaborators_list(self, app: str) -> list[dict]:
        return self.apps.collaborators(self.actor, app)

    def collaborators_add(self, app: str, user: str, role: str) -> dict:
        return self.apps.add_collaborator(self.actor, app, user, role)

    def collaborators_remove(self, app: str, user: str) -> dict:
        return self.apps.remove_collaborator(self.actor, app, user)

    # users

    def users_list(self) -> list[dict]:
        self._require_admin("list users")
        return self.directory.list_users()

    def users_set(self, name: str, flag: str, value: bool) -> dict:
        self._require_admin("change users")
        if name == self.actor.name and flag == "admin" and not value:
            raise InvalidInput("you cannot remove your own admin right; ask another admin")
        return self.directory.set_user_flag(name, flag, value)
