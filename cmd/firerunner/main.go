// Command firerunner is the FireRunner daemon and its operator CLI. Each
// subcommand lives in its own file and registers itself in init. The
// conventions (help exits 0 on stdout, bad usage exits 2 on stderr) are
// internal/cli's.
package main

import (
	"io"
	"os"

	"github.com/firerunner/firerunner/internal/cli"
)

// command is one `firerunner <name>` subcommand, or a group of them (subs).
type command struct {
	name    string
	args    string // synopsis of the positional arguments, e.g. "[DIR]"
	summary string
	run     func(args []string) error
	subs    []command
}

var commands = map[string]command{}

func register(c command) {
	if _, dup := commands[c.name]; dup {
		panic("command registered twice: " + c.name)
	}
	commands[c.name] = c
}

func toCLI(c command) cli.Command {
	cc := cli.Command{Name: c.name, Args: c.args, Summary: c.summary, Run: c.run}
	for _, s := range c.subs {
		cc.Subs = append(cc.Subs, toCLI(s))
	}
	return cc
}

// run is main without the exit: the exit code for args (os.Args[1:]).
func run(args []string, stdout, stderr io.Writer) int {
	var cmds []cli.Command
	for _, c := range commands {
		cmds = append(cmds, toCLI(c))
	}
	return cli.Main("firerunner", cmds, args, stdout, stderr)
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
