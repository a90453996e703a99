// '/' answers the banner the build wrote, '/env/NAME' an environment variable.
const fs = require("fs");
const http = require("http");
const ms = require("ms");

const banner = fs.readFileSync("dist/banner.txt", "utf8");
const started = Date.now();

http.createServer((req, res) => {
  let body = banner;
  if (req.url.startsWith("/env/")) body = process.env[decodeURIComponent(req.url.slice(5))] || "";
  else if (req.url === "/uptime") body = ms(Date.now() - started + 1);
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}).listen(Number(process.env.PORT), "0.0.0.0");
