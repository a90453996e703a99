// The web program: built as bin/web, named by the Procfile as on Heroku.
package main

import (
	"fmt"
	"net/http"
	"os"

	"example.com/devflow-fixture-shop/v2/internal/greeting"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, greeting.Text)
	})
	if err := http.ListenAndServe(":"+os.Getenv("PORT"), nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
