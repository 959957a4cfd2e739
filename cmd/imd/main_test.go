package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/imd-dev/imd/logic"
)

func runCmd(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = run(args, &o, &e)
	return code, o.String(), e.String()
}

func TestHelpOnEveryCommand(t *testing.T) {
	code, out, _ := runCmd("--help")
	if code != 0 {
		t.Fatalf("imd --help exited %d", code)
	}
	for _, c := range commands() {
		if !strings.Contains(out, c.name) {
			t.Errorf("imd --help does not list %q", c.name)
		}
		code, out, errOut := runCmd(c.name, "--help")
		if code != 0 || !strings.Contains(out, "Usage: imd "+c.name) {
			t.Errorf("imd %s --help: exit %d, stdout %q, stderr %q", c.name, code, out, errOut)
		}
	}
	if code, _, errOut := runCmd(); code != 2 || !strings.Contains(errOut, "Commands:") {
		t.Errorf("imd with no command: exit %d, stderr %q", code, errOut)
	}
	if code, _, errOut := runCmd("frobnicate"); code != 2 || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: exit %d, stderr %q", code, errOut)
	}
	if code, _, errOut := runCmd("all", "--no-such-flag"); code != 2 || !strings.Contains(errOut, "no-such-flag") {
		t.Errorf("unknown flag: exit %d, stderr %q", code, errOut)
	}
	if code, out, _ := runCmd("version"); code != 0 || !strings.HasPrefix(out, "imd ") {
		t.Errorf("version: exit %d, %q", code, out)
	}
}

func TestTokenVerifies(t *testing.T) {
	code, out, errOut := runCmd("token", "--config", "../../docs/imd.example.yaml", "--appcode", "102", "--uid", "77")
	if code != 0 {
		t.Fatalf("imd token exited %d: %s", code, errOut)
	}
	tok := strings.TrimSpace(out)
	app := &logic.App{AppCode: 102, Account: 1, Secrets: []string{"change-me-pc-0123456789abcdef"}}
	if err := (logic.HMACAuth{}).Authenticate(context.Background(), app, 77, tok); err != nil {
		t.Fatalf("minted token %q does not verify: %v", tok, err)
	}
	if err := (logic.HMACAuth{}).Authenticate(context.Background(), app, 78, tok); err == nil {
		t.Fatal("token verified for another uid")
	}
	for _, args := range [][]string{
		{"token", "--config", "../../docs/imd.example.yaml"},                                   // no uid
		{"token", "--config", "../../docs/imd.example.yaml", "--uid", "1", "--appcode", "999"}, // unknown appcode
		{"token", "--config", "../../docs/imd.example.yaml", "--uid", "1", "--ttl", "-1s"},
	} {
		if code, _, errOut := runCmd(args...); code == 0 || errOut == "" {
			t.Errorf("%v: exit %d with no error message", args, code)
		}
	}
}
