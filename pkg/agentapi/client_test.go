package agentapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// recorded is one request as the server saw it.
type recorded struct {
	method, uri, auth, contentType, body string
}

// recordingServer answers every request with answer (status code and body)
// and hands what it received to the test.
func recordingServer(t *testing.T, code int, answer string) (*httptest.Server, <-chan recorded) {
	t.Helper()
	got := make(chan recorded, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- recorded{r.Method, r.URL.RequestURI(), r.Header.Get("Authorization"), r.Header.Get("Content-Type"), string(b)}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_, _ = io.WriteString(w, answer)
	}))
	t.Cleanup(srv.Close)
	return srv, got
}

// TestClientRequests: each method sends the request the control API
// defines (method, path, query, body, bearer token) and decodes its answer.
func TestClientRequests(t *testing.T) {
	ctx := context.Background()
	status := `{"name":"ns/vol","role":"Primary","epoch":7,"dataState":"UpToDate","writable":true}`
	wantStatus := func(t *testing.T, st agentapi.Status) {
		t.Helper()
		if st.Name != "ns/vol" || st.Role != agentapi.RolePrimary || st.Epoch != 7 || st.DataState != agentapi.UpToDate || !st.Writable {
			t.Errorf("decoded status %+v", st)
		}
	}
	tests := []struct {
		name     string
		answer   string
		call     func(t *testing.T, c *agentapi.Client) error
		method   string
		uri      string
		wantBody string // "" when the request has none
	}{
		{"Info", `{"node":"n1","nbdAddress":"a:1","replicationAddress":"a:2","controlAddress":"http://a:3","volumes":2}`,
			func(t *testing.T, c *agentapi.Client) error {
				i, err := c.Info(ctx)
				if err == nil && (i != agentapi.Info{Node: "n1", NBDAddress: "a:1", ReplicationAddress: "a:2", ControlAddress: "http://a:3", Volumes: 2}) {
					t.Errorf("decoded info %+v", i)
				}
				return err
			}, "GET", "/v1/info", ""},
		{"List", "[" + status + "]",
			func(t *testing.T, c *agentapi.Client) error {
				l, err := c.List(ctx)
				if err == nil {
					if len(l) != 1 {
						t.Fatalf("decoded %d statuses, want 1", len(l))
					}
					wantStatus(t, l[0])
				}
				return err
			}, "GET", "/v1/volumes", ""},
		{"Get", status,
			func(t *testing.T, c *agentapi.Client) error {
				st, err := c.Get(ctx, "ns", "vol")
				wantStatus(t, st)
				return err
			}, "GET", "/v1/volumes/ns/vol", ""},
		{"Put", status,
			func(t *testing.T, c *agentapi.Client) error {
				st, err := c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 4096,
					Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 7, Mode: agentapi.ModeSync, Initialize: true}})
				wantStatus(t, st)
				return err
			}, "PUT", "/v1/volumes/ns/vol",
			`{"size":1048576,"regionSize":4096,"spec":{"role":"Primary","epoch":7,"mode":"Sync","initialize":true}}`},
		{"Delete", "",
			func(t *testing.T, c *agentapi.Client) error { return c.Delete(ctx, "ns", "vol", false) },
			"DELETE", "/v1/volumes/ns/vol", ""},
		{"Delete purge", "",
			func(t *testing.T, c *agentapi.Client) error { return c.Delete(ctx, "ns", "vol", true) },
			"DELETE", "/v1/volumes/ns/vol?purge=true", ""},
		{"PeerOutdated", status,
			func(t *testing.T, c *agentapi.Client) error {
				st, err := c.PeerOutdated(ctx, "ns", "vol", 9)
				wantStatus(t, st)
				return err
			}, "POST", "/v1/volumes/ns/vol/peer-outdated", `{"epoch":9}`},
		{"Bitmap", `{"regionSize":4096,"runs":[[1,3],[9,9]]}`,
			func(t *testing.T, c *agentapi.Client) error {
				b, err := c.Bitmap(ctx, "ns", "vol")
				if err == nil && (b.RegionSize != 4096 || len(b.Runs) != 2 || b.Runs[1] != [2]uint32{9, 9}) {
					t.Errorf("decoded bitmap %+v", b)
				}
				return err
			}, "GET", "/v1/volumes/ns/vol/bitmap", ""},
		{"Resync", status,
			func(t *testing.T, c *agentapi.Client) error {
				st, err := c.Resync(ctx, "ns", "vol", 5, 2)
				wantStatus(t, st)
				return err
			}, "POST", "/v1/volumes/ns/vol/resync", `{"first":5,"count":2}`},
		{"Checksums", `{"regionSize":4096,"first":5,"algorithm":"sha256","sums":["aa","bb"]}`,
			func(t *testing.T, c *agentapi.Client) error {
				s, err := c.Checksums(ctx, "ns", "vol", 5, 2)
				if err == nil && strings.Join(s.Sums, ",") != "aa,bb" {
					t.Errorf("decoded checksums %+v", s)
				}
				return err
			}, "GET", "/v1/volumes/ns/vol/checksums?first=5&count=2", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, got := recordingServer(t, http.StatusOK, tt.answer)
			if err := tt.call(t, agentapi.NewClient(srv.URL, "s3cret")); err != nil {
				t.Fatal(err)
			}
			r := <-got
			if r.method != tt.method || r.uri != tt.uri {
				t.Errorf("request %s %s, want %s %s", r.method, r.uri, tt.method, tt.uri)
			}
			if r.auth != "Bearer s3cret" {
				t.Errorf("Authorization %q", r.auth)
			}
			if r.body != "" || tt.wantBody != "" {
				if r.contentType != "application/json" {
					t.Errorf("Content-Type %q", r.contentType)
				}
				if !jsonEqual(t, r.body, tt.wantBody) {
					t.Errorf("body %s, want %s", r.body, tt.wantBody)
				}
			}
		})
	}
}

func jsonEqual(t *testing.T, a, b string) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal([]byte(a), &x); err != nil {
		t.Fatalf("%q: %v", a, err)
	}
	if err := json.Unmarshal([]byte(b), &y); err != nil {
		t.Fatalf("%q: %v", b, err)
	}
	return reflect.DeepEqual(x, y)
}

// TestClientErrorAnswers: an answer other than 2xx is an *APIError carrying
// the ErrorBody's message (or the raw body when it is not one); IsNotFound
// is true for 404 only, however the error is wrapped.
func TestClientErrorAnswers(t *testing.T) {
	tests := []struct {
		code     int
		body     string
		wantMsg  string
		notFound bool
	}{
		{404, `{"error":"no volume ns/vol on node n1"}`, "no volume ns/vol on node n1", true},
		{409, `{"error":"epoch 3 is older than 4"}`, "epoch 3 is older than 4", false},
		{401, `{"error":"authentication required"}`, "authentication required", false},
		{502, "bad gateway\n", "bad gateway\n", false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.code), func(t *testing.T) {
			srv, _ := recordingServer(t, tt.code, tt.body)
			_, err := agentapi.NewClient(srv.URL, "s3cret").Get(context.Background(), "ns", "vol")
			var apiErr *agentapi.APIError
			if !errors.As(err, &apiErr) || apiErr.Code != tt.code || apiErr.Message != tt.wantMsg {
				t.Fatalf("err = %#v, want APIError{%d, %q}", err, tt.code, tt.wantMsg)
			}
			if got := agentapi.IsNotFound(err); got != tt.notFound {
				t.Errorf("IsNotFound = %v, want %v", got, tt.notFound)
			}
			if got := agentapi.IsNotFound(fmt.Errorf("probe n1: %w", err)); got != tt.notFound {
				t.Errorf("IsNotFound(wrapped) = %v, want %v", got, tt.notFound)
			}
			if errors.Is(err, agentapi.ErrNotSent) {
				t.Errorf("an answer wraps ErrNotSent: %v", err)
			}
		})
	}
	for _, err := range []error{nil, errors.New("connection refused"), fmt.Errorf("x: %w", agentapi.ErrNotSent)} {
		if agentapi.IsNotFound(err) {
			t.Errorf("IsNotFound(%v) = true", err)
		}
	}
}

// TestClientErrNotSent: a call that never reached the agent says so
// (ErrNotSent); one that may have reached it (the connection was made, the
// answer was lost or late) must not, since the agent may have acted on it.
// The controller relies on this to know whether a peer-outdated
// confirmation can have reached the writer (invariant 2).
func TestClientErrNotSent(t *testing.T) {
	ctx := context.Background()
	addr := testkit.RefusingAddr(t) // nothing listens there
	c := agentapi.NewClient("http://"+addr, "s3cret")
	if _, err := c.PeerOutdated(ctx, "ns", "vol", 1); !errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("call to an address nobody listens on: %v, want ErrNotSent", err)
	}

	// The agent receives the request, then the answer is lost.
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.URL.Path
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer srv.Close()
	c = agentapi.NewClient(srv.URL, "s3cret")
	_, err := c.PeerOutdated(ctx, "ns", "vol", 1)
	if err == nil || errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("call whose answer was lost: %v, want an error that is not ErrNotSent", err)
	}
	if p := <-got; !strings.HasSuffix(p, "/peer-outdated") {
		t.Fatalf("agent saw %q", p)
	}

	// The agent receives the request and answers too late.
	release := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-release }))
	defer slow.Close()
	defer close(release)
	c = agentapi.NewClient(slow.URL, "s3cret")
	c.HTTP.Timeout = 50 * time.Millisecond
	if _, err := c.PeerOutdated(ctx, "ns", "vol", 1); err == nil || errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("call that timed out after connecting: %v, want an error that is not ErrNotSent", err)
	}

	// A context that ended before the call: nothing sent.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.PeerOutdated(cctx, "ns", "vol", 1); !errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("call with a cancelled context: %v, want ErrNotSent", err)
	}
}

// TestChecksumsAnswerChecked: an answer for other regions, or in another
// hash, is an error rather than sums the caller would misread.
func TestChecksumsAnswerChecked(t *testing.T) {
	for _, tt := range []struct{ name, answer, want string }{
		{"other algorithm", `{"regionSize":4096,"first":5,"algorithm":"md5","sums":["aa","bb"]}`, `agent uses "md5"`},
		{"fewer sums", `{"regionSize":4096,"first":5,"algorithm":"sha256","sums":["aa"]}`, "got [5, +1)"},
		{"other first", `{"regionSize":4096,"first":4,"algorithm":"sha256","sums":["aa","bb"]}`, "got [4, +2)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv, _ := recordingServer(t, http.StatusOK, tt.answer)
			_, err := agentapi.NewClient(srv.URL, "s3cret").Checksums(context.Background(), "ns", "vol", 5, 2)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestWireNames pins the JSON names of the bodies: the agent and the
// controller of different releases must keep understanding each other.
func TestWireNames(t *testing.T) {
	f := false
	tm := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"VolumeRequest", agentapi.VolumeRequest{Size: 1, RegionSize: 2, Spec: agentapi.Spec{
			PairUID: "u", Role: agentapi.RoleBackup, Epoch: 3, Mode: agentapi.ModeAsync, PeerNode: "p", PeerAddress: "a:1",
			MergePeerBitmap: &f, MaxBytesPerSecond: 4, Hold: true, Initialize: true, AllowPromoteInconsistent: true}},
			`{"size":1,"regionSize":2,"spec":{"pairUID":"u","role":"Backup","epoch":3,"mode":"Async","peerNode":"p","peerAddress":"a:1",
			"mergePeerBitmap":false,"maxBytesPerSecond":4,"hold":true,"initialize":true,"allowPromoteInconsistent":true}}`},
		{"Status", agentapi.Status{Name: "ns/v", Size: 1, RegionSize: 2, Role: agentapi.RoleNone, Epoch: 3, Mode: agentapi.ModeSync,
			DataState: agentapi.Inconsistent, DataStateReason: "r", Joined: true, PairUID: "u", UnmergedRegions: 4, Writable: true,
			Reason: "w", PeerConnected: true, PeerNode: "p", OutOfSyncRegions: 5, OutOfSyncBytes: 6, BitmapsLost: true,
			Copy: agentapi.CopyStatus{Running: true, TotalBytes: 7, DoneBytes: 8, BytesPerSecond: 9, ETASeconds: 10, StartTime: tm,
				FullCopy: true, Reason: "c", CopiedBytesTotal: 11},
			OldestUnreplicatedSeconds: 1.5, WaitingForPeerOutdated: 12, Holding: true, HoldSeconds: 2.5, Drained: true,
			LastHoldSeconds: 3.5, HeldWrites: 13, ForwardedWrites: 14,
			Counters: agentapi.Counters{Writes: 1, WriteBytes: 2, Reads: 3, ReadBytes: 4, Flushes: 5, FramesSent: 6, FramesApplied: 7,
				Reconnects: 8, RejectedFrames: 9},
			LastError: "e", LastErrorTime: tm},
			`{"name":"ns/v","size":1,"regionSize":2,"role":"None","epoch":3,"mode":"Sync","dataState":"Inconsistent",
			"dataStateReason":"r","joined":true,"pairUID":"u","unmergedRegions":4,"writable":true,"reason":"w",
			"peerConnected":true,"peerNode":"p","outOfSyncRegions":5,"outOfSyncBytes":6,"bitmapsLost":true,
			"copy":{"running":true,"totalBytes":7,"doneBytes":8,"bytesPerSecond":9,"etaSeconds":10,"startTime":"2024-01-02T03:04:05Z",
			"fullCopy":true,"reason":"c","copiedBytesTotal":11},
			"oldestUnreplicatedSeconds":1.5,"waitingForPeerOutdated":12,"holding":true,"holdSeconds":2.5,"drained":true,
			"lastHoldSeconds":3.5,"heldWrites":13,"forwardedWrites":14,
			"counters":{"writes":1,"writeBytes":2,"reads":3,"readBytes":4,"flushes":5,"framesSent":6,"framesApplied":7,
			"reconnects":8,"rejectedFrames":9},
			"lastError":"e","lastErrorTime":"2024-01-02T03:04:05Z"}`},
		{"zero Status", agentapi.Status{},
			`{"name":"","size":0,"regionSize":0,"role":"","epoch":0,"mode":"","dataState":"","writable":false,"peerConnected":false,
			"outOfSyncRegions":0,"outOfSyncBytes":0,"copy":{"running":false,"totalBytes":0,"doneBytes":0,"bytesPerSecond":0,
			"etaSeconds":0,"copiedBytesTotal":0},"oldestUnreplicatedSeconds":0,"waitingForPeerOutdated":0,"holding":false,
			"drained":false,"lastHoldSeconds":0,"heldWrites":0,"forwardedWrites":0,"counters":{"writes":0,"writeBytes":0,
			"reads":0,"readBytes":0,"flushes":0,"framesSent":0,"framesApplied":0,"reconnects":0,"rejectedFrames":0}}`},
		{"PeerOutdatedRequest", agentapi.PeerOutdatedRequest{Epoch: 1}, `{"epoch":1}`},
		{"ResyncRequest", agentapi.ResyncRequest{First: 1, Count: 2}, `{"first":1,"count":2}`},
		{"Info", agentapi.Info{Node: "n", NBDAddress: "a", ReplicationAddress: "b", ControlAddress: "c", Volumes: 1},
			`{"node":"n","nbdAddress":"a","replicationAddress":"b","controlAddress":"c","volumes":1}`},
		{"Bitmap", agentapi.Bitmap{RegionSize: 1, Runs: [][2]uint32{{2, 3}}}, `{"regionSize":1,"runs":[[2,3]]}`},
		{"Checksums", agentapi.Checksums{RegionSize: 1, First: 2, Algorithm: "sha256", Sums: []string{"x"}},
			`{"regionSize":1,"first":2,"algorithm":"sha256","sums":["x"]}`},
		{"ErrorBody", agentapi.ErrorBody{Error: "no"}, `{"error":"no"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := json.Marshal(tt.v)
			if err != nil {
				t.Fatal(err)
			}
			if !jsonEqual(t, string(b), tt.want) {
				t.Errorf("%s\nwant %s", b, tt.want)
			}
		})
	}
}

func TestMergesPeerBitmap(t *testing.T) {
	yes, no := true, false
	for _, tt := range []struct {
		v    *bool
		want bool
	}{{nil, true}, {&yes, true}, {&no, false}} {
		if got := (agentapi.Spec{MergePeerBitmap: tt.v}).MergesPeerBitmap(); got != tt.want {
			t.Errorf("MergePeerBitmap %v: MergesPeerBitmap() = %v, want %v", tt.v, got, tt.want)
		}
	}
}

func TestReplicaDir(t *testing.T) {
	if got, want := agentapi.ReplicaDir("/var/lib/tandem", "ns", "vol"), "/var/lib/tandem/volumes/ns/vol"; got != want {
		t.Errorf("ReplicaDir = %q, want %q", got, want)
	}
}
