package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Mutual TLS (Config.TLS; package tlsid has the files, the identities and
// the reload). What is checked where:
//
//   - Replication listener: the primary must present a certificate of the
//     CA bundle naming a node (spiffe://tandem.dev/node/<node>); its Hello
//     must name that same node (replIdentityOK), or the stream is refused
//     with a Nack and a logged reason. One node's certificate cannot open a
//     stream as another node.
//   - Replication dial (tlsDial): the backup must present a certificate of
//     the CA bundle naming a node; when the address dialed is the address of
//     a peer some volume's spec names (every spec names its peers' nodes and
//     addresses), the certificate must name that peer's node
//     (expectedPeers). An address no spec names (not expected in practice)
//     only needs a node certificate. The backup's HelloAck must then name
//     the node its certificate names (ackCheckConn), or the connection is
//     closed: the volume learns the backup's node from it.
//   - Control API: a client certificate is optional at the handshake (the
//     kubelet's probes of /healthz and /metrics have none); every /v1 call
//     needs a verified one, and the mutating ones (PUT, DELETE, POST) need
//     the manager's identity (controlIdentityOK). The bearer token is
//     checked as well: both must pass.

// tlsDial wraps dial (nil: TCP) in a TLS client handshake that presents
// this node's certificate and checks the peer's (see above).
func (a *Agent) tlsDial(dial volume.DialFunc) volume.DialFunc {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		var c net.Conn
		var err error
		if dial != nil {
			c, err = dial(ctx, addr)
		} else {
			var d net.Dialer
			c, err = d.DialContext(ctx, "tcp", addr)
		}
		if err != nil {
			return nil, err
		}
		want := a.expectedPeers(addr)
		tc := tls.Client(c, a.cfg.TLS.ClientConfig(func(id tlsid.Identity) error {
			node, ok := id.Node()
			if !ok {
				return fmt.Errorf("peer %s presented %s, not a node's identity", addr, id)
			}
			if len(want) > 0 && !slices.Contains(want, node) {
				return fmt.Errorf("peer %s presented the identity of node %s, want %v", addr, node, want)
			}
			return nil
		}))
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("TLS handshake with %s: %w", addr, err)
		}
		// The verification above accepted a node identity.
		id, _ := tlsid.CertIdentity(tc.ConnectionState().PeerCertificates[0])
		node, _ := id.Node()
		return &ackCheckConn{Conn: tc, node: node}, nil
	}
}

// maxAckPeek bounds the first frame ackCheckConn reads (a HelloAck is a few
// hundred bytes of JSON).
const maxAckPeek = 64 << 10

// ackCheckConn is the primary's side of a TLS replication connection. It
// reads the backup's first frame as it passes to the volume, and refuses a
// HelloAck naming another node than the backup's certificate (node): the
// volume keeps its bitmaps about the node the HelloAck names, so a backup
// cannot pass for another node either. The frame's last bytes are
// withheld until it was checked.
type ackCheckConn struct {
	*tls.Conn
	node    string
	buf     []byte
	checked bool
}

func (c *ackCheckConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.checked || n == 0 {
		return n, err
	}
	c.buf = append(c.buf, p[:n]...)
	f, perr := repl.NewReader(bytes.NewReader(c.buf), maxAckPeek).Next()
	switch {
	case perr == nil:
	case errors.Is(perr, io.ErrUnexpectedEOF):
		return n, err // not all there yet
	case errors.Is(perr, repl.ErrTooLarge):
		c.Conn.Close()
		return 0, fmt.Errorf("the backup's first frame is larger than %d bytes: %w", maxAckPeek, perr)
	default:
		c.checked, c.buf = true, nil
		return n, err // garbage: the volume reports it
	}
	c.checked, c.buf = true, nil
	if f.Type == repl.TypeHelloAck {
		var ack volume.HelloAck
		if jerr := json.Unmarshal(f.Payload, &ack); jerr == nil && ack.Node != c.node {
			c.Conn.Close()
			return 0, fmt.Errorf("authentication failed: the backup's HelloAck names node %q, its TLS certificate node %q", ack.Node, c.node)
		}
	}
	return n, err
}

// expectedPeers returns the nodes the volumes' specs name at addr.
func (a *Agent) expectedPeers(addr string) []string {
	var out []string
	for _, v := range a.list() {
		for _, p := range v.Spec().Peers() {
			if p.Address == addr && p.Node != "" && !slices.Contains(out, p.Node) {
				out = append(out, p.Node)
			}
		}
	}
	return out
}

// replIdentityOK checks that the primary whose Hello names node is the
// node its TLS certificate names; "" when it is (or without TLS), else why
// not.
func (a *Agent) replIdentityOK(c net.Conn, node string) string {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return ""
	}
	id, err := tlsid.PeerIdentity(tc.ConnectionState())
	if err != nil {
		return "authentication failed: " + err.Error()
	}
	if id != tlsid.NodeIdentity(node) {
		return fmt.Sprintf("authentication failed: the TLS certificate names %s, the Hello node %q", id, node)
	}
	return ""
}

// controlIdentityOK checks a control API call's TLS identity (with TLS
// configured): "" when it may make the call, else why not.
func (a *Agent) controlIdentityOK(r *http.Request) string {
	if a.cfg.TLS == nil {
		return ""
	}
	if r.TLS == nil {
		return "a TLS client certificate is required"
	}
	id, err := tlsid.PeerIdentity(*r.TLS)
	if err != nil {
		return "a TLS client certificate is required: " + err.Error()
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		return ""
	}
	if id != tlsid.Manager {
		return fmt.Sprintf("only %s may %s; the client certificate names %s", tlsid.Manager, r.Method, id)
	}
	return ""
}

// tlsInfo adds the current certificate to /v1/info's answer.
func (a *Agent) tlsInfo(info *agentapi.Info) {
	if a.cfg.TLS == nil {
		return
	}
	s := a.cfg.TLS
	info.TLS = &agentapi.TLSInfo{Identity: string(s.Identity()), Serial: s.Serial(), NotBefore: s.NotBefore(), NotAfter: s.NotAfter()}
}

var descTLSNotAfter = prometheus.NewDesc("tandem_agent_tls_not_after_seconds",
	"Expiry of the TLS certificate the agent presents (Unix seconds); serial: its serial number in hex. Absent without mutual TLS.", []string{"serial"}, nil)

// tlsCollector exports the current certificate's expiry: a renewal shows
// as a new serial and a later value.
type tlsCollector struct{ a *Agent }

func (c tlsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descTLSNotAfter }

func (c tlsCollector) Collect(ch chan<- prometheus.Metric) {
	if s := c.a.cfg.TLS; s != nil {
		ch <- prometheus.MustNewConstMetric(descTLSNotAfter, prometheus.GaugeValue, float64(s.NotAfter().Unix()), s.Serial())
	}
}
