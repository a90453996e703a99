// The build step: writes what the server shows, proving `yarn run build` ran before start.
const fs = require("fs");
fs.mkdirSync("dist", { recursive: true });
fs.writeFileSync("dist/banner.txt", "yarn v1");
console.log("built dist/banner.txt");
