package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/tandem-storage/tandem/internal/tlsid"
)

// TestBenchTLS: a node directory the bench writes loads as that node's
// --tls-dir, and the bench's control client (the manager's certificate)
// completes a mutual TLS handshake with an agent serving it.
func TestBenchTLS(t *testing.T) {
	ca, err := newBenchTLS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir, err := ca.nodeDir("tls-a")
	if err != nil {
		t.Fatal(err)
	}
	node, err := tlsid.Load(dir, tlsid.WithIdentity(tlsid.NodeIdentity("tls-a")))
	if err != nil {
		t.Fatalf("load the node's directory: %v", err)
	}
	c, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	srv := tls.Server(s, node.ServerConfig(true))
	errc := make(chan error, 1)
	go func() {
		if err := srv.Handshake(); err != nil {
			errc <- err
			return
		}
		id, err := tlsid.PeerIdentity(srv.ConnectionState())
		if err == nil && id != tlsid.Manager {
			t.Errorf("the agent sees %s, want the manager", id)
		}
		errc <- err
	}()
	if err := tls.Client(c, ca.client).Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
}

// TestTLSTargets: each TLS pair follows its plain pair in the target list,
// and only a list naming one (or none: all) starts the TLS agents.
func TestTLSTargets(t *testing.T) {
	for _, m := range []string{"async", "sync"} {
		if i := slices.Index(targets, m); i < 0 || i+1 >= len(targets) || targets[i+1] != m+"-tls" {
			t.Errorf("targets %v: %s-tls does not follow %s", targets, m, m)
		}
	}
	for _, tc := range []struct {
		list []string
		want bool
	}{{nil, true}, {[]string{"async", "sync"}, false}, {[]string{"sync-tls"}, true}, {[]string{"nbdkit", "async-tls"}, true}} {
		if got := wantsTLS(tc.list); got != tc.want {
			t.Errorf("wantsTLS(%v) = %v, want %v", tc.list, got, tc.want)
		}
	}
}

// TestTLSCost: the TLS cost table divides each TLS pair's IOPS and CPU per
// GiB by its plain pair's, and is left out without a TLS target.
func TestTLSCost(t *testing.T) {
	one := func(v float64) stat { return stat{N: 1, Med: v, Min: v, Max: v} }
	s := &fioSet{Rows: []fioRow{
		{Workload: "4K", Target: "async", IOPS: one(1000), CPU: one(4)},
		{Workload: "4K", Target: "async-tls", IOPS: one(800), CPU: one(5)},
		{Workload: "4K", Target: "sync", IOPS: one(500)},
		{Workload: "1M", Target: "sync", IOPS: one(100), CPU: one(2)},
		{Workload: "1M", Target: "sync-tls", IOPS: one(50), CPU: one(3)},
	}}
	var b strings.Builder
	p := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	tlsCost(p, s)
	out := b.String()
	for _, want := range []string{"### TLS cost", "| 4K | async | 800 vs 1000 (0.80×) | 5.00 s/GiB vs 4.00 s/GiB (1.25×) |", "| 1M | sync | 50 vs 100 (0.50×) | 3.00 s/GiB vs 2.00 s/GiB (1.50×) |"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "| 4K | sync |") {
		t.Errorf("a row for sync on 4K, which has no TLS run:\n%s", out)
	}
	b.Reset()
	tlsCost(p, &fioSet{Rows: s.Rows[:1]})
	if b.Len() != 0 {
		t.Errorf("without a TLS target: %q", b.String())
	}
}

// TestFioOrder: the targets of a round. A variant section does not start
// the TLS pairs and must not run them (it dereferenced a missing target
// before); a target asked for by name must exist.
func TestFioOrder(t *testing.T) {
	all := map[string]bool{}
	for _, n := range targets {
		all[n] = true
	}
	noTLS := map[string]bool{}
	for _, n := range targets {
		if !strings.HasSuffix(n, "-tls") {
			noTLS[n] = true
		}
	}
	for _, tc := range []struct {
		name    string
		started map[string]bool
		asked   []string
		want    []string
		wantErr string
	}{
		{"main section", all, nil, targets, ""},
		{"variant: no TLS pairs", noTLS, nil, slices.DeleteFunc(slices.Clone(targets), func(n string) bool { return strings.HasSuffix(n, "-tls") }), ""},
		{"asked for", all, []string{"qemu-async", "async"}, []string{"async", "qemu-async"}, ""},
		{"a TLS pair asked for but not started", noTLS, []string{"async-tls"}, nil, "async-tls did not start"},
		{"unknown", all, []string{"asnyc"}, nil, "no fio target asnyc"},
	} {
		got, err := fioOrder(targets, tc.started, tc.asked)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: error %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
}
