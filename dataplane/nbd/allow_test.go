package nbd

import (
	"net/netip"
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

// TestAllowedClients: a client outside AllowedClients is closed before the
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
			env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.AllowedClients = tc.allow })
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
