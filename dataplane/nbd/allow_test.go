package nbd

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseAllowedClients(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    string // prefixes joined by space
		wantErr string
	}{
		{in: "", want: ""},
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: " 10.1.2.3/8 , 192.168.1.7", want: "10.0.0.0/8 192.168.1.7/32"},
		{in: "::1,fd00::/8", want: "::1/128 fd00::/8"},
		{in: "::ffff:127.0.0.1", want: "127.0.0.1/32"},
		{in: "10.0.0.0/8,,", want: "10.0.0.0/8"},
		{in: "node-a", wantErr: `"node-a" is neither`},
		{in: "10.0.0.0/33", wantErr: "neither"},
	} {
		got, err := ParseAllowedClients(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseAllowedClients(%q) error = %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseAllowedClients(%q): %v", tc.in, err)
			continue
		}
		var s []string
		for _, p := range got {
			s = append(s, p.String())
		}
		if strings.Join(s, " ") != tc.want {
			t.Errorf("ParseAllowedClients(%q) = %v, want %s", tc.in, s, tc.want)
		}
	}
}

// TestAllowedClients: a client outside Server.Allow is closed before the
// greeting, with a logged reason; one inside negotiates as usual.
func TestAllowedClients(t *testing.T) {
	for _, tc := range []struct {
		name  string
		allow []netip.Prefix
		ok    bool
	}{
		{"no list", nil, true},
		{"loopback allowed", []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, true},
		{"other network only", []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.Allow = NewAllowList(tc.allow, false) })
			c := dial(t, env.addr)
			b, err := c.readFull(18)
			if tc.ok {
				if err != nil {
					t.Fatalf("allowed client got no greeting: %v", err)
				}
				_ = b
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				c.goExport(testExport)
				return
			}
			if err == nil {
				t.Fatalf("refused client got a greeting % x", b)
			}
			env.logs.waitFor(t, "Refusing NBD connection: client address not allowed")
			if got := env.srv.Stats().Refused; got != 1 {
				t.Errorf("Stats().Refused = %d, want 1", got)
			}
		})
	}
}

// TestAllowList: what each --nbd-allowed-clients value admits, before and
// after the nodes' addresses are known.
func TestAllowList(t *testing.T) {
	node := netip.MustParseAddr("198.18.0.11")
	pod := netip.MustParseAddr("10.244.1.7")
	outsider := netip.MustParseAddr("203.0.113.9")
	office := netip.MustParseAddr("192.168.7.3")
	loop := netip.MustParseAddr("127.0.0.1")
	everyone := []netip.Addr{node, pod, outsider, office, loop}
	nodeNets := []netip.Prefix{netip.MustParsePrefix("198.18.0.11/32"), netip.MustParsePrefix("10.244.1.0/24")}
	for _, tc := range []struct {
		in      string
		wantErr string
		// admitted before SetNodes, and after
		before, after []netip.Addr
	}{
		{in: "", before: everyone, after: everyone},
		{in: "any", before: everyone, after: everyone},
		{in: "nodes", before: []netip.Addr{loop}, after: []netip.Addr{node, pod, loop}},
		{in: "nodes, 192.168.7.0/24", before: []netip.Addr{office, loop}, after: []netip.Addr{node, pod, office, loop}},
		{in: "192.168.7.3", before: []netip.Addr{office}, after: []netip.Addr{office}},
		{in: "::ffff:192.168.7.3", before: []netip.Addr{office}, after: []netip.Addr{office}},
		{in: "any,nodes", wantErr: "any admits every client"},
		{in: "any,10.0.0.0/8", wantErr: "any admits every client"},
		{in: "node-a", wantErr: "or the keywords nodes, any"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			a, err := ParseAllowList(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseAllowList(%q) error = %v, want %q", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			check := func(when string, want []netip.Addr) {
				for _, addr := range []netip.Addr{node, pod, outsider, office, loop, netip.AddrFrom16(office.As16())} {
					wantOK := slices.Contains(want, addr.Unmap())
					if got := a.Allowed(addr); got != wantOK {
						t.Errorf("%s, %s: Allowed(%s) = %v, want %v (%s)", tc.in, when, addr, got, wantOK, a)
					}
				}
			}
			check("before the nodes are known", tc.before)
			a.SetNodes(nodeNets)
			check("after", tc.after)
		})
	}
	var none *AllowList
	if !none.Allowed(netip.MustParseAddr("203.0.113.9")) || !none.Any() {
		t.Fatal("a nil AllowList refuses")
	}
}
