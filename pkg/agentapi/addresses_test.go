package agentapi_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func TestReadListenAddresses(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "addresses.json")
	if _, err := agentapi.ReadListenAddresses(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("before the agent wrote it: %v, want os.ErrNotExist", err)
	}
	for name, tc := range map[string]struct {
		body string
		ok   bool
	}{
		"complete":   {`{"control":"http://127.0.0.1:7400","replication":"127.0.0.1:7401","nbd":"127.0.0.1:10809"}`, true},
		"with pprof": {`{"control":"http://127.0.0.1:1","replication":"127.0.0.1:2","nbd":"127.0.0.1:3","pprof":"127.0.0.1:4"}`, true},
		"no nbd":     {`{"control":"http://127.0.0.1:1","replication":"127.0.0.1:2"}`, false},
		"not json":   {`control=1`, false},
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(p, []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			a, err := agentapi.ReadListenAddresses(p)
			if (err == nil) != tc.ok {
				t.Fatalf("ReadListenAddresses(%s) = %+v, %v; want ok=%v", tc.body, a, err, tc.ok)
			}
			if tc.ok && (a.Control == "" || a.Replication == "" || a.NBD == "") {
				t.Fatalf("decoded %+v", a)
			}
		})
	}
}
