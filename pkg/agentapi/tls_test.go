package agentapi_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestNewTLSAPI: the clients of NewTLSAPI present the caller's certificate
// to an agent that requires one, and share one kept-alive connection.
func TestNewTLSAPI(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	agentSrc := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-a")))
	manager := tlsidtest.Load(t, ca.Dir(t, tlsid.Manager))
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := tlsid.PeerIdentity(*r.TLS)
		if err != nil || id != tlsid.Manager {
			http.Error(w, `{"error":"not the manager"}`, http.StatusForbidden)
			return
		}
		_, _ = io.WriteString(w, `{"name":"ns/vol"}`)
	}))
	srv.TLS = agentSrc.ServerConfig(true)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()

	newAPI := agentapi.NewTLSAPI(manager.ClientConfig(nil))
	for range 3 {
		if st, err := newAPI(srv.URL, "tok").Get(context.Background(), "ns", "vol"); err != nil || st.Name != "ns/vol" {
			t.Fatalf("Get = %+v, %v", st, err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 3 calls, want 1 (kept alive)", n)
	}
	// Without the config the agent refuses the handshake.
	plain := agentapi.NewClient(srv.URL, "tok")
	plain.HTTP.Transport = agentapi.TLSTransport(&tls.Config{InsecureSkipVerify: true})
	if _, err := plain.Get(context.Background(), "ns", "vol"); err == nil {
		t.Error("a client without a certificate was answered")
	}
}
