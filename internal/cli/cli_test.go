package cli

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"
)

func tree(ran *[]string) []Command {
	leaf := func(name string) func([]string) error {
		return func(args []string) error {
			fs := flag.NewFlagSet(name, flag.ContinueOnError)
			fs.Bool("v", false, "be verbose")
			if err := Parse(fs, args); err != nil {
				return err
			}
			if err := MaxArgs(fs, 1); err != nil {
				return err
			}
			if fs.Arg(0) == "fail" {
				return errors.New("it failed")
			}
			*ran = append(*ran, name)
			return nil
		}
	}
	return []Command{
		{Name: "run", Args: "[WHAT]", Summary: "run it", Run: leaf("run")},
		{Name: "own", Summary: "parses with its own FlagSet", Run: func(args []string) error {
			fs := flag.NewFlagSet("own", flag.ContinueOnError)
			fs.SetOutput(&bytes.Buffer{})
			return fs.Parse(args)
		}},
		{Name: "grp", Summary: "a group", Subs: []Command{{Name: "sub", Summary: "the sub", Run: leaf("grp sub")}}},
	}
}

func TestDispatch(t *testing.T) {
	for _, c := range []struct {
		args           []string
		code           int
		stdout, stderr string // substrings; "" means must be empty
		ran            string
	}{
		{nil, 2, "", "usage: p <command>", ""},
		{[]string{"-h"}, 0, "usage: p <command>", "", ""},
		{[]string{"help"}, 0, "  grp  a group", "", ""},
		{[]string{"help", "grp", "sub"}, 0, "usage: p grp sub [flags]", "", ""},
		{[]string{"help", "nope"}, 2, "", `p: unknown command "nope"`, ""},
		{[]string{"nope"}, 2, "", `p: unknown command "nope"`, ""},
		{[]string{"-x"}, 2, "", `p: unknown flag "-x"`, ""},
		{[]string{"run"}, 0, "", "", "run"},
		{[]string{"run", "-v", "x"}, 0, "", "", "run"},
		{[]string{"run", "--help"}, 0, "usage: p run [flags] [WHAT]\n\nrun it\n\nflags:\n  -v\tbe verbose", "", ""},
		{[]string{"run", "-z"}, 2, "", "p run: flag provided but not defined: -z\n\nusage: p run [flags] [WHAT]", ""},
		{[]string{"run", "a", "b"}, 2, "", `p run: unexpected argument "b"`, ""},
		{[]string{"run", "fail"}, 1, "", "p run: it failed\n", ""},
		{[]string{"own", "-h"}, 0, "usage: p own", "", ""},
		{[]string{"grp"}, 2, "", "usage: p grp <command>", ""},
		{[]string{"grp", "--help"}, 0, "  sub  the sub", "", ""},
		{[]string{"grp", "x"}, 2, "", `p grp: unknown command "x"`, ""},
		{[]string{"grp", "sub", "-h"}, 0, "usage: p grp sub [flags]", "", ""},
		{[]string{"grp", "sub"}, 0, "", "", "grp sub"},
	} {
		var ran []string
		var out, errb bytes.Buffer
		code := Main("p", tree(&ran), c.args, &out, &errb)
		check := func(what, got, want string) {
			if (want == "" && got != "") || !strings.Contains(got, want) {
				t.Errorf("p %q: %s = %q, want it to contain %q", c.args, what, got, want)
			}
		}
		if code != c.code {
			t.Errorf("p %q: exit %d, want %d (stderr %q)", c.args, code, c.code, errb.String())
		}
		check("stdout", out.String(), c.stdout)
		check("stderr", errb.String(), c.stderr)
		if strings.Join(ran, ",") != c.ran {
			t.Errorf("p %q ran %v, want %q", c.args, ran, c.ran)
		}
	}
}

func TestHelpErrorIsErrHelp(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	err := Parse(fs, []string{"--help"})
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("Parse(--help) = %v, want an error matching flag.ErrHelp", err)
	}
}
