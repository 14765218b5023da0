package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

func newTestAgent(t *testing.T) (*Agent, *httptest.Server) {
	t.Helper()
	a, err := New(Config{Node: "node-a", DataDir: t.TempDir(), Token: "s3cret", Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		if err := a.Close(); err != nil {
			t.Error(err)
		}
	})
	return a, srv
}

func TestControlAPIAuth(t *testing.T) {
	_, srv := newTestAgent(t)
	tests := []struct {
		name, method, path, auth string
		want                     int
	}{
		{"healthz is open", "GET", "/healthz", "", 200},
		{"metrics are open", "GET", "/metrics", "", 200},
		{"no token", "GET", "/v1/volumes", "", 401},
		{"wrong token", "GET", "/v1/volumes", "Bearer nope", 401},
		{"basic auth is not a bearer token", "GET", "/v1/volumes", "Basic czNjcmV0", 401},
		{"right token", "GET", "/v1/volumes", "Bearer s3cret", 200},
		{"put without token", "PUT", "/v1/volumes/ns/v", "", 401},
		{"unknown volume", "GET", "/v1/volumes/ns/missing", "Bearer s3cret", 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, srv.URL+tt.path, nil)
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Fatalf("%s %s = %d, want %d", tt.method, tt.path, resp.StatusCode, tt.want)
			}
		})
	}
}

func TestControlAPIVolumeLifecycle(t *testing.T) {
	a, srv := newTestAgent(t)
	c := NewClient(srv.URL, "s3cret")
	ctx := context.Background()
	req := VolumeRequest{Size: 8 << 20, RegionSize: 64 << 10, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}}
	st, err := c.Put(ctx, "ns", "vol", req)
	if err != nil {
		t.Fatal(err)
	}
	if st.Role != volume.RolePrimary || !st.Writable || st.Epoch != 1 || st.DataState != volume.UpToDate {
		t.Fatalf("status after PUT: %+v", st)
	}
	// Idempotent.
	if _, err := c.Put(ctx, "ns", "vol", req); err != nil {
		t.Fatalf("second identical PUT: %v", err)
	}
	// The export is served only by the writer.
	if _, err := a.Lookup("ns/vol"); err != nil {
		t.Fatalf("Lookup of the writer's export: %v", err)
	}
	if got := a.List(); len(got) != 1 || got[0] != "ns/vol" {
		t.Fatalf("List = %v", got)
	}

	var apiErr *APIError
	cases := []struct {
		name string
		req  VolumeRequest
		ns   string
		code int
		msg  string
	}{
		{"older epoch", VolumeRequest{Size: 8 << 20, RegionSize: 64 << 10, Spec: volume.Spec{Role: volume.RoleBackup, Epoch: 0}}, "ns", 409, "older than the replica's epoch"},
		{"shrink", VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true}}, "ns", 409, "has size 8388608; 4194304 asked is smaller, and a volume never shrinks"},
		{"region size change", VolumeRequest{Size: 8 << 20, RegionSize: 128 << 10, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true}}, "ns", 409, "exists with size 8388608 and region size 65536"},
		{"unknown role", VolumeRequest{Size: 8 << 20, RegionSize: 64 << 10, Spec: volume.Spec{Role: "Leader", Epoch: 1}}, "ns", 409, "unknown role"},
		{"zero size", VolumeRequest{Size: 0, RegionSize: 64 << 10}, "ns", 400, "must be positive"},
		{"bad namespace", VolumeRequest{Size: 8 << 20, RegionSize: 64 << 10}, "Bad_NS", 400, "not a valid Kubernetes namespace"},
	}
	for _, tc := range cases {
		_, err := c.Put(ctx, tc.ns, "vol", tc.req)
		if !errors.As(err, &apiErr) || apiErr.Code != tc.code || !strings.Contains(apiErr.Message, tc.msg) {
			t.Errorf("%s: err = %v, want %d containing %q", tc.name, err, tc.code, tc.msg)
		}
	}

	// Unknown JSON fields are refused rather than silently ignored.
	r, _ := http.NewRequest("PUT", srv.URL+"/v1/volumes/ns/vol", bytes.NewBufferString(`{"size":1,"regionSize":4096,"spce":{}}`))
	r.Header.Set("Authorization", "Bearer s3cret")
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Errorf("misspelt field: %d, want 400", resp.StatusCode)
	}

	if _, err := c.PeerOutdated(ctx, "ns", "vol", 7); !errors.As(err, &apiErr) || apiErr.Code != 409 {
		t.Errorf("peer-outdated at a wrong epoch: %v, want 409", err)
	}
	if _, err := c.PeerOutdated(ctx, "ns", "vol", 1); err != nil {
		t.Errorf("peer-outdated: %v", err)
	}
	// Step down: the export is refused with the reason.
	if _, err := c.Put(ctx, "ns", "vol", VolumeRequest{Size: 8 << 20, RegionSize: 64 << 10, Spec: volume.Spec{Role: volume.RoleBackup, Epoch: 2}}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Lookup("ns/vol"); err == nil || !strings.Contains(err.Error(), "Backup at epoch 2") {
		t.Fatalf("Lookup of a backup: %v", err)
	}
	if list, err := c.List(ctx); err != nil || len(list) != 1 {
		t.Fatalf("List: %v %v", list, err)
	}
	if err := c.Delete(ctx, "ns", "vol", true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "ns", "vol"); !errors.As(err, &apiErr) || apiErr.Code != 404 {
		t.Fatalf("GET after delete: %v", err)
	}
}

// TestReopenFenced: after a restart every replica comes back fenced with its
// epoch, and the controller must apply a role before it serves.
func TestReopenFenced(t *testing.T) {
	dir := t.TempDir()
	a, err := New(Config{Node: "node-a", DataDir: dir, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	v, err := a.open("ns", "vol", 8<<20, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 5, Initialize: true}); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(context.Background(), []byte("hello"), 4096, true); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Node: "node-a", DataDir: dir, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	st := b.get("ns/vol").Status()
	if st.Role != volume.RoleNone || st.Writable || st.Epoch != 5 {
		t.Fatalf("reopened replica: %+v, want fenced at epoch 5", st)
	}
	if _, err := b.Lookup("ns/vol"); err == nil {
		t.Fatal("a fenced replica must not be exported")
	}
	// Alone since creation: the write is in the bitmap (the peer never had it).
	if st.OutOfSyncRegions != 1 {
		t.Fatalf("reopened replica lost its bitmap: %d dirty regions, want 1", st.OutOfSyncRegions)
	}
}

// TestInfoWhileServingReplication: ServeReplication records its listen
// address while the control API may already answer /v1/info (the agent
// starts both at once). Under -race this caught an unguarded write.
func TestInfoWhileServingReplication(t *testing.T) {
	a, srv := newTestAgent(t)
	c := NewClient(srv.URL, "s3cret")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	infos := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 20 && err == nil; i++ {
			_, err = c.Info(ctx)
		}
		infos <- err
	}()
	go func() { served <- a.ServeReplication(ctx, ln) }()
	if err := <-infos; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.ReplicationAddress == ln.Addr().String() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/v1/info reports replication address %q, want %q", info.ReplicationAddress, ln.Addr())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// TestInfoKeepsAdvertisedReplicationAddress: the address advertised with
// SetAddresses (what peers dial) is what /v1/info reports, not the listen
// address ServeReplication got, which may be a wildcard such as ":7401".
func TestInfoKeepsAdvertisedReplicationAddress(t *testing.T) {
	a, srv := newTestAgent(t)
	a.SetAddresses("198.18.0.11:10809", "198.18.0.11:7401", "http://198.18.0.11:7400")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.ServeReplication(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	c := NewClient(srv.URL, "s3cret")
	// ServeReplication is past its start once it has closed a connection
	// whose first frame is garbage.
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(make([]byte, 64)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, conn); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the bad connection was not closed: %v", err) // EOF or a reset: closed
	}
	conn.Close()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.ReplicationAddress != "198.18.0.11:7401" {
		t.Fatalf("/v1/info reports replication address %q, want the advertised 198.18.0.11:7401", info.ReplicationAddress)
	}
}
