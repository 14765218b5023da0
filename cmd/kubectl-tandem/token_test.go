package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReadTokenFileDuringRotation: a token file that lists several tokens
// (a rotation under way, package token) gives the first, the one every
// agent accepts at each step.
func TestReadTokenFileDuringRotation(t *testing.T) {
	for content, want := range map[string]string{"s3cret\n": "s3cret", "new\nold\n": "new", "\n  new  \nold": "new"} {
		f := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got, err := readTokenFile(f); err != nil || got != want {
			t.Errorf("readTokenFile(%q) = %q, %v; want %q", content, got, err, want)
		}
	}
}
