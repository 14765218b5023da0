package agent_test

// FuzzControlAPI throws random methods, paths, queries, bodies and
// Authorization headers at the control API handler. Whatever the input, the
// handler must not panic, must not answer 5xx (malformed input gets 400, 401,
// 404, 405 or 409; ServeMux may redirect an unclean path), and must never
// answer 2xx to a /v1 call without the right token. The seed corpus runs as
// an ordinary test; make stress runs it with -fuzz.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

const fuzzToken = "fuzz-token"

// newFuzzAgent starts the one agent every fuzz iteration of this process
// shares (opening one per input would dominate the run). Its peers cannot be
// dialled: a fuzzed peerAddress must not make the test connect anywhere.
func newFuzzAgent(f *testing.F) http.Handler {
	a, err := agent.New(agent.Config{Node: "node-f", DataDir: f.TempDir(), Token: fuzzToken, Log: logr.Discard(),
		Dial: func(context.Context, string) (net.Conn, error) { return nil, errors.New("fuzz: dialling disabled") }})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = a.Close() })
	return a.Handler()
}

// resetFuzzAgent brings the agent back to one volume, ns/base: a small
// primary at epoch 3 with a few dirty regions.
func resetFuzzAgent(t *testing.T, h http.Handler) {
	call := func(method, path string, body any) *httptest.ResponseRecorder {
		var rd *bytes.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		} else {
			rd = bytes.NewReader(nil)
		}
		req := httptest.NewRequest(method, path, rd)
		req.Header.Set("Authorization", "Bearer "+fuzzToken)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	rec := call("GET", "/v1/volumes", nil)
	var list []volume.Status
	if err := json.Unmarshal(rec.Body.Bytes(), &list); err != nil {
		t.Fatalf("list volumes: %v: %s", err, rec.Body)
	}
	for _, s := range list {
		if s.Name != "ns/base" || s.Size != 1<<20 || s.RegionSize != 4096 {
			if rec := call("DELETE", "/v1/volumes/"+s.Name+"?purge=true", nil); rec.Code != http.StatusNoContent {
				t.Fatalf("reset: delete %s: %d %s", s.Name, rec.Code, rec.Body)
			}
		}
	}
	rec = call("GET", "/v1/volumes/ns/base", nil)
	var st volume.Status
	_ = json.Unmarshal(rec.Body.Bytes(), &st)
	if rec.Code == http.StatusOK && st.Role == volume.RolePrimary && st.Epoch == 3 {
		return
	}
	if rec := call("DELETE", "/v1/volumes/ns/base?purge=true", nil); rec.Code != http.StatusNoContent {
		t.Fatalf("reset: delete ns/base: %d %s", rec.Code, rec.Body)
	}
	if rec := call("PUT", "/v1/volumes/ns/base", agent.VolumeRequest{Size: 1 << 20, RegionSize: 4096,
		Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 3, Mode: volume.ModeAsync, Initialize: true}}); rec.Code != http.StatusOK {
		t.Fatalf("reset: create ns/base: %d %s", rec.Code, rec.Body)
	}
}

// Authorization header variants.
var fuzzAuth = []string{"", "Bearer " + fuzzToken, "Bearer wrong", "Basic Zm9vOmJhcg==", "Bearer ", "bearer " + fuzzToken, "Bearer " + fuzzToken + " "}

func FuzzControlAPI(f *testing.F) {
	put := func(v any) []byte { b, _ := json.Marshal(v); return b }
	ok := agent.VolumeRequest{Size: 1 << 20, RegionSize: 4096, Spec: volume.Spec{Role: volume.RoleBackup, Epoch: 4, Mode: volume.ModeSync, PeerNode: "x"}}
	seeds := []struct {
		method, path string
		body         []byte
	}{
		{"GET", "/healthz", nil},
		{"GET", "/metrics", nil},
		{"GET", "/v1/info", nil},
		{"GET", "/v1/volumes", nil},
		{"GET", "/v1/volumes/ns/base", nil},
		{"GET", "/v1/volumes/ns/missing", nil},
		{"GET", "/v1/volumes/ns/base/bitmap", nil},
		{"GET", "/v1/volumes/ns/base/checksums?first=0&count=4", nil},
		{"GET", "/v1/volumes/ns/base/checksums?first=255&count=2", nil},
		{"GET", "/v1/volumes/ns/base/checksums?first=-1", nil},
		{"GET", "/v1/volumes/ns/base/checksums?count=99999999999", nil},
		{"GET", "/v1/volumes/ns/base/checksums?first=4294967295&count=4294967295", nil},
		{"PUT", "/v1/volumes/ns/new", put(ok)},
		{"PUT", "/v1/volumes/ns/base", put(ok)},
		{"PUT", "/v1/volumes/ns/base", put(agent.VolumeRequest{Size: 1 << 20, RegionSize: 4096, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true}})},
		{"PUT", "/v1/volumes/ns/base", put(agent.VolumeRequest{Size: 2 << 20, RegionSize: 4096, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 3}})},
		{"PUT", "/v1/volumes/ns/base", put(agent.VolumeRequest{Size: 1 << 20, RegionSize: 4096, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 9, Mode: "Quantum"}})},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":3000}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":256}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":4611686018427387904,"regionSize":1073741824}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":9223372036854775807,"regionSize":4096}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048577,"regionSize":4096}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":512}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":134217728}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":144115188075855872,"regionSize":67108864}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1,"regionSize":4611686018427387904}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":-1,"regionSize":4096}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1e30,"regionSize":4096}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spec":{"role":"Primary","epoch":1,"peerAddress":"10.0.0.1:1","mode":"Sync"}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spec":{"role":"Primary","epoch":1,"peerAddress":"::::"}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spec":{"role":"Primary","epoch":18446744073709551615}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spec":{"role":"Primary","maxBytesPerSecond":-5}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spec":{"role":"Backup","hold":true}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096,"spce":{}}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":"big"}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`{"size":1048576,"regionSize":4096}{"trailing":1}`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`[`)},
		{"PUT", "/v1/volumes/ns/new", []byte(`null`)},
		{"PUT", "/v1/volumes/ns/new", nil},
		{"PUT", "/v1/volumes/NS/new", put(ok)},
		{"PUT", "/v1/volumes/ns/" + strings.Repeat("a", 300), put(ok)},
		{"PUT", "/v1/volumes/ns/..", put(ok)},
		{"PUT", "/v1/volumes/ns/a%2Fb", put(ok)},
		{"PUT", "/v1/volumes/ns/a%00b", put(ok)},
		{"PUT", "/v1/volumes/ns/new/extra", put(ok)},
		{"POST", "/v1/volumes/ns/base/peer-outdated", []byte(`{"epoch":3}`)},
		{"POST", "/v1/volumes/ns/base/peer-outdated", []byte(`{"epoch":2}`)},
		{"POST", "/v1/volumes/ns/base/peer-outdated", []byte(`{"epoch":-2}`)},
		{"POST", "/v1/volumes/ns/base/peer-outdated", []byte(`{}`)},
		{"POST", "/v1/volumes/ns/missing/peer-outdated", []byte(`{"epoch":3}`)},
		{"DELETE", "/v1/volumes/ns/base", nil},
		{"DELETE", "/v1/volumes/ns/missing", nil},
		{"DELETE", "/v1/volumes/ns/missing?purge=true", nil},
		{"DELETE", "/v1/volumes/..%2F..%2Fetc/passwd?purge=true", nil},
		{"DELETE", "/v1/volumes/ns/..?purge=true", nil},
		{"DELETE", "/v1/volumes", nil},
		{"PATCH", "/v1/volumes/ns/base", []byte(`{}`)},
		{"OPTIONS", "*", nil},
		{"CONNECT", "/v1/info", nil},
		{"TRACE", "/v1/volumes", nil},
		{"GET", "/v1//volumes", nil},
		{"GET", "/v1/volumes/ns/base/../base", nil},
		{"GET", "/v1/volumes/%zz", nil},
		{"GET", "/../../etc/passwd", nil},
		{"POST", "/healthz", nil},
	}
	for _, s := range seeds {
		for auth := range uint8(3) {
			f.Add(s.method, s.path, s.body, auth)
		}
	}
	h := newFuzzAgent(f)
	f.Fuzz(func(t *testing.T, method, target string, body []byte, auth uint8) {
		resetFuzzAgent(t, h)
		if !strings.HasPrefix(target, "/") && target != "*" {
			target = "/" + target
		}
		req, err := http.NewRequest(method, "http://agent"+target, bytes.NewReader(body))
		if err != nil {
			return // not an HTTP request a client could send
		}
		if target == "*" {
			req.URL.Path = "*"
		}
		req.RequestURI = target
		req.RemoteAddr = "192.0.2.1:1234"
		hdr := fuzzAuth[int(auth)%len(fuzzAuth)]
		if hdr != "" {
			req.Header.Set("Authorization", hdr)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req) // a panic fails the fuzz target
		code := rec.Code
		switch {
		case code >= 500:
			t.Fatalf("%s %q (auth %q) = %d: %s", method, target, hdr, code, rec.Body)
		case code >= 300 && code < 400:
			if rec.Header().Get("Location") == "" {
				t.Fatalf("%s %q = %d without Location", method, target, code)
			}
		case code >= 400:
			switch code {
			case 400, 401, 404, 405, 409:
			default:
				t.Fatalf("%s %q (auth %q) = %d, want 400/401/404/405/409 for a refused request: %s", method, target, hdr, code, rec.Body)
			}
			if strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
				var e struct {
					Error string `json:"error"`
				}
				if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error == "" {
					t.Fatalf("%s %q = %d with a JSON body without an error message: %s", method, target, code, rec.Body)
				}
			}
		}
		authorized := hdr == "Bearer "+fuzzToken
		if !authorized && code < 300 && strings.HasPrefix(req.URL.Path, "/v1") {
			t.Fatalf("%s %q without the right token (auth %q) = %d: the control API must refuse it", method, target, hdr, code)
		}
	})
}
