// The worker program: built as bin/worker.
package main

import (
	"fmt"
	"time"
)

func main() {
	for {
		fmt.Println("worker tick")
		time.Sleep(time.Minute)
	}
}
