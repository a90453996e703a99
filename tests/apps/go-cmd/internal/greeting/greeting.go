// Package greeting is shared by the programs under cmd/: a library package, which builds no binary.
package greeting

// Text is what the web program answers.
const Text = "go-cmd v1"
