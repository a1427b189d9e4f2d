// Package cli holds FireRunner's command-line conventions, shared by every
// command and subcommand:
//   - -h, -help, --help (and `help`) print usage on stdout and exit 0;
//   - an unknown command, subcommand or flag, or a bad argument, prints the
//     problem and usage on stderr and exits 2;
//   - any other error prints "<prog> <cmd>: <error>" on stderr and exits 1.
package cli

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
)

// Command is one command, or a group of subcommands (Subs set, Run nil).
type Command struct {
	Name string
	// Args is the synopsis after the flags, e.g. "[DIR]" (flags are shown
	// when the command takes any).
	Args    string
	Summary string
	Run     func(args []string) error
	Subs    []Command
}

// HelpError is returned by Parse when help was asked for; Flags holds the
// flag defaults to print.
type HelpError struct{ Flags string }

func (e *HelpError) Error() string { return "help requested" }

// Is makes errors.Is(err, flag.ErrHelp) true for a *HelpError.
func (e *HelpError) Is(target error) bool { return target == flag.ErrHelp }

// UsageError is a bad invocation: the command line, not the work, is wrong.
type UsageError struct {
	Msg   string
	Flags string // flag defaults, when known
}

func (e *UsageError) Error() string { return e.Msg }

// Usagef returns a *UsageError (exit 2 with usage), for bad arguments a
// command finds after its flags parsed.
func Usagef(format string, a ...any) error {
	return &UsageError{Msg: fmt.Sprintf(format, a...)}
}

// Parse parses args into fs (made with flag.ContinueOnError) without
// printing anything. -h/--help gives a *HelpError and a bad flag a
// *UsageError; both carry fs's flag defaults, and Main prints them.
func Parse(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	if err == nil {
		return nil
	}
	if errors.Is(err, flag.ErrHelp) {
		return &HelpError{Flags: flagDefaults(fs)}
	}
	return &UsageError{Msg: err.Error(), Flags: flagDefaults(fs)}
}

// NoArgs returns a *UsageError when fs has positional arguments left.
func NoArgs(fs *flag.FlagSet) error { return MaxArgs(fs, 0) }

// MaxArgs returns a *UsageError when fs has more than n positional arguments.
func MaxArgs(fs *flag.FlagSet, n int) error {
	if fs.NArg() > n {
		return &UsageError{Msg: fmt.Sprintf("unexpected argument %q", fs.Arg(n)), Flags: flagDefaults(fs)}
	}
	return nil
}

func flagDefaults(fs *flag.FlagSet) string {
	var b bytes.Buffer
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	return b.String()
}

// Main runs the command args names under prog and returns the exit code:
// 0 done or help, 1 the command failed, 2 bad usage.
func Main(prog string, cmds []Command, args []string, stdout, stderr io.Writer) int {
	root := Command{Name: prog, Subs: cmds}
	return run(root, prog, args, stdout, stderr)
}

func isHelp(a string) bool { return a == "-h" || a == "-help" || a == "--help" }

func run(c Command, path string, args []string, stdout, stderr io.Writer) int {
	if len(c.Subs) > 0 {
		if len(args) == 0 {
			writeUsage(stderr, c, path, "")
			return 2
		}
		if isHelp(args[0]) {
			writeUsage(stdout, c, path, "")
			return 0
		}
		if args[0] == "help" {
			return help(c, path, args[1:], stdout, stderr)
		}
		sub, ok := find(c.Subs, args[0])
		if !ok {
			what := "command"
			if strings.HasPrefix(args[0], "-") {
				what = "flag"
			}
			fmt.Fprintf(stderr, "%s: unknown %s %q\n\n", path, what, args[0])
			writeUsage(stderr, c, path, "")
			return 2
		}
		return run(sub, path+" "+sub.Name, args[1:], stdout, stderr)
	}
	err := c.Run(args)
	var he *HelpError
	var ue *UsageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &he):
		writeUsage(stdout, c, path, he.Flags)
		return 0
	case errors.Is(err, flag.ErrHelp):
		// A command that parsed with its own FlagSet: the flag package
		// already printed the defaults (to the FlagSet's output).
		writeUsage(stdout, c, path, "")
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s: %s\n\n", path, ue.Msg)
		writeUsage(stderr, c, path, ue.Flags)
		return 2
	}
	fmt.Fprintf(stderr, "%s: %v\n", path, err)
	return 1
}

// help runs `prog [group] help [cmd ...]`: usage of the named command on
// stdout.
func help(c Command, path string, names []string, stdout, stderr io.Writer) int {
	for _, n := range names {
		sub, ok := find(c.Subs, n)
		if !ok {
			fmt.Fprintf(stderr, "%s: unknown command %q\n\n", path, n)
			writeUsage(stderr, c, path, "")
			return 2
		}
		c, path = sub, path+" "+sub.Name
	}
	if len(c.Subs) > 0 {
		writeUsage(stdout, c, path, "")
		return 0
	}
	// A leaf: ask it for its flags, as -h would.
	return run(c, path, []string{"-h"}, stdout, stderr)
}

func find(cmds []Command, name string) (Command, bool) {
	for _, c := range cmds {
		if c.Name == name {
			return c, true
		}
	}
	return Command{}, false
}

func writeUsage(w io.Writer, c Command, path, flags string) {
	if len(c.Subs) > 0 {
		fmt.Fprintf(w, "usage: %s <command> [flags]\n", path)
		if c.Summary != "" {
			fmt.Fprintf(w, "\n%s\n", c.Summary)
		}
		fmt.Fprintln(w, "\ncommands:")
		subs := append([]Command(nil), c.Subs...)
		sort.Slice(subs, func(i, j int) bool { return subs[i].Name < subs[j].Name })
		width := 0
		for _, s := range subs {
			width = max(width, len(s.Name))
		}
		for _, s := range subs {
			fmt.Fprintf(w, "  %-*s  %s\n", width, s.Name, s.Summary)
		}
		fmt.Fprintf(w, "\nRun '%s <command> -h' for a command's flags.\n", path)
		return
	}
	line := "usage: " + path
	if flags != "" {
		line += " [flags]"
	}
	if c.Args != "" {
		line += " " + c.Args
	}
	fmt.Fprintln(w, line)
	if c.Summary != "" {
		fmt.Fprintf(w, "\n%s\n", c.Summary)
	}
	if flags != "" {
		fmt.Fprintf(w, "\nflags:\n%s", flags)
	}
}
