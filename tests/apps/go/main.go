// A Go web app with no dependencies beyond the standard library: DevFlow runs `go build` and the binary.
package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "go v1")
	})
	http.HandleFunc("/env/GREETING", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getenv("GREETING"))
	})
	if err := http.ListenAndServe(":"+os.Getenv("PORT"), nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
