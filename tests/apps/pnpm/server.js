// '/' answers the banner the build wrote and a duration formatted by the `ms` dependency.
const fs = require("fs");
const http = require("http");
const ms = require("ms");

const banner = fs.readFileSync("dist/banner.txt", "utf8");

http.createServer((req, res) => {
  const body = `${banner} with ms ${ms(60000)}`;
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}).listen(Number(process.env.PORT), "0.0.0.0");
