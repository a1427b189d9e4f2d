// Command frimage is `firerunner image` alone, so `make image` works even
// while other packages of the daemon do not build; same code, same flags.
package main

import (
	"fmt"
	"os"

	"github.com/firerunner/firerunner/internal/image"
)

func main() {
	if err := image.CLI(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "firerunner image: %v\n", err)
		os.Exit(1)
	}
}
