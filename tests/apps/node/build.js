// The build step: writes what the server shows, proving `npm run build` ran before start.
const fs = require("fs");
fs.mkdirSync("dist", { recursive: true });
fs.writeFileSync("dist/banner.txt", "node v1");
console.log("built dist/banner.txt");
