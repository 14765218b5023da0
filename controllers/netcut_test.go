package controllers

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// nodeNet is an in-process agent's network as tests can cut it: its access
// to the API server (agent Lease and authority renewals), and its
// replication connections to and from peers. The controller's probes are cut
// separately (blocker).
type nodeNet struct {
	apiCut  atomic.Bool
	replCut atomic.Bool

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

var errPartitioned = errors.New("test partition: link cut")

type cutTransport struct {
	rt  http.RoundTripper
	cut []*atomic.Bool // any of them set cuts
}

func (c cutTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	for _, cut := range c.cut {
		if cut.Load() {
			return nil, errPartitioned
		}
	}
	return c.rt.RoundTrip(r)
}

// clientset is the node's own client of the API server, cut while apiCut
// or any of also is set.
func (nn *nodeNet) clientset(t testing.TB, also ...*atomic.Bool) kubernetes.Interface {
	c := rest.CopyConfig(cfg)
	cut := append([]*atomic.Bool{&nn.apiCut}, also...)
	c.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return cutTransport{rt: rt, cut: cut} }
	kc, err := kubernetes.NewForConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	return kc
}

func (nn *nodeNet) track(c net.Conn) {
	nn.mu.Lock()
	if nn.conns == nil {
		nn.conns = map[net.Conn]struct{}{}
	}
	nn.conns[c] = struct{}{}
	nn.mu.Unlock()
}

// dial connects to a peer unless replication is cut.
func (nn *nodeNet) dial(ctx context.Context, addr string) (net.Conn, error) {
	if nn.replCut.Load() {
		return nil, errPartitioned
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		nn.track(c)
	}
	return c, err
}

type cutListener struct {
	net.Listener
	nn *nodeNet
}

func (l cutListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.nn.replCut.Load() {
			c.Close()
			continue
		}
		l.nn.track(c)
		return c, nil
	}
}

// listener wraps the node's replication listener.
func (nn *nodeNet) listener(l net.Listener) net.Listener { return cutListener{Listener: l, nn: nn} }

// cutReplication cuts (on) or restores the node's replication links: open
// connections are closed, new ones refused.
func (nn *nodeNet) cutReplication(on bool) {
	nn.replCut.Store(on)
	if !on {
		return
	}
	nn.mu.Lock()
	defer nn.mu.Unlock()
	for c := range nn.conns {
		c.Close()
	}
	nn.conns = nil
}
