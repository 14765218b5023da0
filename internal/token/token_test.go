package token

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/internal/testkit"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]string{
		"":                      "",
		"s3cret\n":              "s3cret",
		"  old \n\n new\r\n":    "old new",
		"new\nold\n":            "new old",
		"one two\nthree":        "one two three", // a line is one token, inner spaces kept
		"\n\n":                  "",
		"tok-with-trailing \t ": "tok-with-trailing",
	} {
		if got := strings.Join(Parse([]byte(in)), " "); got != want {
			t.Errorf("Parse(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSource(t *testing.T) {
	var none *Source
	if none.Enabled() || none.Send() != "" || !none.Accept("anything") {
		t.Fatal("a nil Source must have authentication off")
	}
	if off := Static(""); off.Enabled() || !off.Accept("") {
		t.Fatal(`Static("") must have authentication off`)
	}
	s := Static("new", "old")
	if !s.Enabled() || s.Send() != "new" || !s.Accept("new") || !s.Accept("old") || s.Accept("") || s.Accept("ne") || s.Accept("newer") {
		t.Fatalf("Static(new, old): send %q, accepts new %v old %v", s.Send(), s.Accept("new"), s.Accept("old"))
	}
}

// TestRotation: the three steps of a rotation through the file, reloaded by
// Watch: accept the new token, then send it, then forget the old one. A file
// emptied or removed meanwhile leaves the tokens as they were.
func TestRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	write := func(s string) {
		t.Helper()
		// As the kubelet does: a new file renamed over the old.
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write("old\n")
	s, err := FromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Watch(ctx, 10*time.Millisecond, logr.Discard()) }()
	defer func() { cancel(); <-done }()
	state := func() string {
		var acc []string
		for _, tok := range []string{"old", "new"} {
			if s.Accept(tok) {
				acc = append(acc, tok)
			}
		}
		return "send " + s.Send() + ", accept " + strings.Join(acc, " ")
	}
	wait := func(want string) {
		t.Helper()
		testkit.Eventually(t, 5*time.Second, want, func() (bool, string) { return state() == want, state() }, testkit.Every(5*time.Millisecond))
	}
	wait("send old, accept old")
	write("old\nnew\n")
	wait("send old, accept old new")
	write("new\nold\n")
	wait("send new, accept old new")
	write("\n") // being rewritten: keep what was loaded
	if _, err := s.Reload(); err == nil || !strings.Contains(err.Error(), "holds no token") {
		t.Fatalf("Reload of an empty file: %v", err)
	}
	if got := state(); got != "send new, accept old new" {
		t.Fatalf("after an empty file: %s", got)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reload(); err == nil {
		t.Fatal("Reload of a missing file succeeded")
	}
	write("new\n")
	wait("send new, accept new")

	if _, err := FromFile(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("FromFile of a missing file succeeded")
	}
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := FromFile(empty); err == nil || !strings.Contains(err.Error(), "holds no token") {
		t.Fatalf("FromFile of an empty file: %v", err)
	}
}
