package main

import (
	"flag"
	"fmt"
	"runtime"

	"github.com/firerunner/firerunner/internal/cli"
	"github.com/firerunner/firerunner/internal/version"
)

func init() {
	register(command{name: "version", summary: "print the version", run: func(args []string) error {
		fs := flag.NewFlagSet("version", flag.ContinueOnError)
		if err := cli.Parse(fs, args); err != nil {
			return err
		}
		if err := cli.NoArgs(fs); err != nil {
			return err
		}
		fmt.Printf("firerunner %s (%s, %s/%s)\n", version.Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return nil
	}})
}
