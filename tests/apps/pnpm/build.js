// The build step: writes what the server shows, proving `pnpm run build` ran before start.
const fs = require("fs");
fs.mkdirSync("dist", { recursive: true });
fs.writeFileSync("dist/banner.txt", "pnpm v1");
console.log("built dist/banner.txt");
