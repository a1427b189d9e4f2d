package main

import (
	"fmt"
	"runtime"

	"github.com/firerunner/firerunner/internal/version"
)

func init() {
	register(command{name: "version", summary: "print the version", run: func([]string) error {
		fmt.Printf("firerunner %s (%s, %s/%s)\n", version.Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return nil
	}})
}
