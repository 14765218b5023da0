package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMissingEnvtest(t *testing.T) {
	empty := t.TempDir()
	full := t.TempDir()
	if err := os.Mkdir(filepath.Join(full, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"kube-apiserver", "etcd"} {
		if err := os.WriteFile(filepath.Join(full, "bin", f), nil, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		root string
		want map[string]bool
		err  string // "" for none
	}{
		{"every section, no tools", empty, map[string]bool{}, "needs bin/kube-apiserver and bin/etcd"},
		{"failover, no tools", empty, map[string]bool{"fio": true, "failover": true}, "failover section needs bin/kube-apiserver"},
		{"fio only, no tools", empty, map[string]bool{"fio": true, "resync": true}, ""},
		{"failover, tools built", full, map[string]bool{"failover": true}, ""},
	} {
		err := missingEnvtest(tc.root, tc.want)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.err)
		}
	}
}
