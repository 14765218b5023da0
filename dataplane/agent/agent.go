// Package agent is Tandem's per-node agent: it owns the replicas under its
// data directory, serves the acting primaries over NBD, accepts replication
// streams for the backups, and answers the controller's control API.
//
// # Running an agent
//
// Run assembles one from Options (Config, the three listeners, the control
// API's limits, the NBD server's settings, and a Kubernetes Lease client for
// registration and authority) and serves until its context ends, then shuts
// down in the order that loses nothing (see Run). cmd/agent maps its flags
// onto Options; tests run in-process agents with it, on listeners they
// create once and hand over. The pieces (New, ServeControl, Handler,
// ServeReplication, Register, KubeAuthority) stay exported for the tests
// that drive one of them alone.
//
// # Control API (HTTP/JSON)
//
// The agent serves the control API of package agentapi (the contract
// between controller and agent: endpoints, bodies, errors, client).
// ServeControl bounds the connections (timeouts for headers, request,
// response and idle keep-alives, header size, connection count: see
// ControlLimits). With Config.TLS it is HTTPS, and /v1 needs a client
// certificate as well as the token (tls.go).
//
// # Replication listener
//
// A primary connects, sends a Hello frame (package repl) naming the volume,
// its node, epoch and the cluster token; the agent hands the stream to that
// volume, which refuses it with a Nack if the roles or epochs do not match.
// With Config.TLS the connection is mutual TLS first, and the Hello must
// name the node the primary's certificate names (tls.go).
//
// Until its token is checked a connection is anonymous, and costs little:
// the Hello is read unbuffered with a payload limit of a few KiB
// (maxHelloPayload) within a deadline (helloTimeout); the 256 KiB read
// buffer and the full 32 MiB frame limit come only after the token matched.
// At most Config.MaxReplicationConns connections are open at once, and at
// most Config.MaxReplicationHandshakes of them before their token was
// checked; the listener closes the ones above at once, with a logged reason.
// Accept errors that pass (EMFILE, ENFILE, ECONNABORTED...) are retried with
// a backoff, as net/http does, instead of ending the listener.
//
// # On disk
//
//	<data-dir>/volumes/<namespace>/<name>/data      the replica (sparse file)
//	<data-dir>/volumes/<namespace>/<name>/meta      metadata (package meta)
//	<data-dir>/volumes/<namespace>/<name>/bitmap/   journal and checkpoints (package bitmap)
//
// After a restart every replica found there is opened fenced (role None)
// with its recovered bitmap, until the controller applies a role and epoch.
package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/time/rate"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/token"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Config configures an Agent.
type Config struct {
	// Node is this agent's node name.
	Node string
	// DataDir holds the replicas.
	DataDir string
	// Token authenticates the control API and replication streams. Empty
	// disables authentication (tests only; the shipped manifests set one).
	Token string
	// Tokens, when set, replaces Token: the tokens of the token file,
	// reloaded while the agent runs (package token: rotation without a
	// restart).
	Tokens *token.Source
	// PayloadChecksums asks for payload checksums on every replication
	// link (volume.Options.PayloadChecksums).
	PayloadChecksums bool
	// Authority gates writes of every volume (nil: the control API's word).
	Authority volume.Authority
	// Dial connects to peers (nil: TCP). With TLS, the agent runs the TLS
	// handshake on the connections it returns.
	Dial volume.DialFunc
	// TLS, when set, is this node's certificate, key and CA bundle
	// (package tlsid; its certificate must name Node): the replication
	// link and the control API then use mutual TLS with per-node
	// identities (tls.go says what is checked where), on top of the
	// token. Nil: plaintext.
	TLS *tlsid.Source
	// AdvertiseHost is the address peers and clients use to reach this
	// agent: Run advertises its listeners' ports on this host (in /v1/info
	// and on the agent Lease). Empty: the listeners' own host, or 127.0.0.1
	// for a wildcard.
	AdvertiseHost string
	// MaxReplicationConns bounds the replication connections open at once
	// (0: DefaultMaxReplicationConns), MaxReplicationHandshakes those whose
	// token has not been checked yet (0: DefaultMaxReplicationHandshakes).
	MaxReplicationConns, MaxReplicationHandshakes int
	// Budget is the agent-wide budget of in-flight request payloads; the
	// volumes charge the requests their peer forwards to them to it (the
	// NBD server shares it). Nil: unbounded.
	Budget *budget.Budget
	// Clock is the agent's clock (nil: clock.RealClock{}): every volume
	// reads and reports time by it (volume.Options.Clock), and Run gives
	// it to the Kubernetes authority and registration (WithClock).
	Clock clock.WithTicker
	Log   logr.Logger
}

// Replication listener limits.
const (
	// DefaultMaxReplicationConns: a node serves one stream per backup
	// replica it holds; this is far above any real count.
	DefaultMaxReplicationConns = 1024
	// DefaultMaxReplicationHandshakes: real primaries connect once per
	// link (and again after a loss); more anonymous connections at once
	// than this are a flood.
	DefaultMaxReplicationHandshakes = 64
	// maxHelloPayload bounds the first frame of a connection, read before
	// its token is checked. A Hello is a few hundred bytes of JSON.
	maxHelloPayload = 4 << 10
	// helloTimeout bounds how long a connection may take to send its Hello.
	helloTimeout = 10 * time.Second
	// replBufferSize is the read buffer of an authenticated stream.
	replBufferSize = 256 << 10
)

// Agent is one node's agent.
type Agent struct {
	cfg Config
	log logr.Logger

	mu      sync.Mutex
	volumes map[string]*volume.Volume

	// Each volume's NBD client restriction (clients.go).
	clientsMu sync.Mutex
	clients   map[string]*atomic.Pointer[clientsState]

	// The listen addresses reported by /v1/info; a.mu guards them.
	nbdAddr, replAddr, controlAddr string

	// Replication connections open, and still anonymous (handshaking).
	replConns, replHandshakes atomic.Int64
	replRefused               atomic.Int64 // closed at once: over a limit
	replRefuseLog             rate.Sometimes

	// stopping is set when the agent was asked to stop (BeginStopping).
	stopping atomic.Bool

	// replTLS is the replication listener's TLS config (nil: plaintext).
	replTLS *tls.Config
	// nbdTLS is what the NBD server does with TLS (set by Run).
	nbdTLS NBDTLSMode
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)

// ValidName checks "<namespace>/<name>".
func ValidName(ns, name string) error {
	if !nameRE.MatchString(ns) || len(ns) > 63 {
		return fmt.Errorf("namespace %q is not a valid Kubernetes namespace name", ns)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("name %q is not a valid Kubernetes object name", name)
	}
	return nil
}

// New opens every replica found under cfg.DataDir, fenced.
func New(cfg Config) (*Agent, error) {
	if cfg.Node == "" {
		return nil, errors.New("agent: node name is required")
	}
	if cfg.DataDir == "" {
		return nil, errors.New("agent: data dir is required")
	}
	if cfg.MaxReplicationConns <= 0 {
		cfg.MaxReplicationConns = DefaultMaxReplicationConns
	}
	if cfg.MaxReplicationHandshakes <= 0 {
		cfg.MaxReplicationHandshakes = DefaultMaxReplicationHandshakes
	}
	if cfg.Tokens == nil {
		cfg.Tokens = token.Static(cfg.Token)
	}
	a := &Agent{cfg: cfg, log: cfg.Log.WithValues("node", cfg.Node), volumes: map[string]*volume.Volume{}}
	if cfg.TLS != nil {
		if id := cfg.TLS.Identity(); id != tlsid.NodeIdentity(cfg.Node) {
			return nil, fmt.Errorf("agent: the TLS certificate in %s names %s, not this node (%s)", cfg.TLS.Dir(), id, tlsid.NodeIdentity(cfg.Node))
		}
		a.cfg.Dial = a.tlsDial(cfg.Dial)
		a.replTLS = cfg.TLS.ServerConfig(true)
	}
	// A flood of refused connections must not flood the log too.
	a.replRefuseLog = rate.Sometimes{First: 5, Interval: 5 * time.Second}
	root := filepath.Join(cfg.DataDir, "volumes")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	nss, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("agent: scan %s: %w", root, err)
	}
	for _, ns := range nss {
		if !ns.IsDir() {
			continue
		}
		names, err := os.ReadDir(filepath.Join(root, ns.Name()))
		if err != nil {
			return nil, fmt.Errorf("agent: scan: %w", err)
		}
		for _, n := range names {
			dir := filepath.Join(root, ns.Name(), n.Name())
			m, err := meta.Read(dir)
			if err != nil {
				a.log.Error(err, "Skipping replica with unreadable metadata", "dir", dir)
				continue
			}
			if _, err := a.open(ns.Name(), n.Name(), m.Size, m.RegionSize); err != nil {
				a.Close()
				return nil, err
			}
		}
	}
	return a, nil
}

func (a *Agent) dir(ns, name string) string {
	return agentapi.ReplicaDir(a.cfg.DataDir, ns, name)
}

// open opens or creates a replica; a.mu must not be held. A replica
// smaller than size grows to it (volume.Grow: durably, before open
// returns), one on disk included, which is opened at its own size first so
// that a grow that fails (EFBIG: more than the node's file system holds)
// leaves it open, usable, at its old size. A replica larger than size is
// refused with errConflict (a volume never shrinks), as is another region
// size.
func (a *Agent) open(ns, name string, size, regionSize int64) (*volume.Volume, error) {
	key := ns + "/" + name
	a.mu.Lock()
	v := a.volumes[key]
	if v == nil {
		dir := a.dir(ns, name)
		openSize := size
		if m, err := meta.Read(dir); err == nil && m.Size < size && m.RegionSize == regionSize {
			openSize = m.Size
		}
		var err error
		v, err = volume.Open(volume.Options{
			Name: key, Node: a.cfg.Node, Dir: dir, Size: openSize, RegionSize: regionSize,
			Authority: a.cfg.Authority, Dial: a.cfg.Dial, Token: a.cfg.Tokens.Send, PayloadChecksums: a.cfg.PayloadChecksums, Budget: a.cfg.Budget, Clock: a.cfg.Clock, Log: a.log,
		})
		if err != nil {
			a.mu.Unlock()
			if errors.Is(err, volume.ErrShrink) {
				return nil, fmt.Errorf("%w: %w", errConflict, err)
			}
			return nil, err
		}
		a.volumes[key] = v
	}
	a.mu.Unlock()
	cur, rs := v.Size(), v.Status().RegionSize
	switch {
	case rs != regionSize:
		return nil, fmt.Errorf("%w: volume %s exists with size %d and region size %d", errConflict, key, cur, rs)
	case size < cur:
		return nil, fmt.Errorf("%w: volume %s has size %d; %d asked is smaller, and a volume never shrinks", errConflict, key, cur, size)
	case size > cur:
		if err := v.Grow(size); err != nil {
			return nil, err // it names both sizes; the replica keeps its size
		}
	}
	return v, nil
}

func (a *Agent) get(key string) *volume.Volume {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.volumes[key]
}

func (a *Agent) list() []*volume.Volume {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*volume.Volume, 0, len(a.volumes))
	for _, v := range a.volumes {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out
}

// remove closes a replica and, with purge, deletes its files.
func (a *Agent) remove(ns, name string, purge bool) error {
	key := ns + "/" + name
	a.mu.Lock()
	v := a.volumes[key]
	delete(a.volumes, key)
	a.mu.Unlock()
	a.forgetClients(key)
	if v != nil {
		if err := v.Close(); err != nil {
			a.log.Error(err, "Closing replica", "volume", key)
		}
	}
	if purge {
		if err := os.RemoveAll(a.dir(ns, name)); err != nil {
			return fmt.Errorf("purge %s: %w", key, err)
		}
	}
	if v == nil && !purge {
		return errNotFound
	}
	return nil
}

// Close closes every replica (clean-shutdown checkpoints), all at once: each
// may wait a few seconds for the writes it admitted (volume.Close), and a
// shutdown must fit in the pod's grace period whatever the number of
// replicas.
func (a *Agent) Close() error {
	vols := a.list()
	errs := make([]error, len(vols))
	var wg sync.WaitGroup
	for i, v := range vols {
		wg.Go(func() { errs[i] = v.Close() })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// tokenOK reports whether got is one of the current tokens (constant-time
// comparisons; token.Source).
func (a *Agent) tokenOK(got string) bool { return a.cfg.Tokens.Accept(got) }

// Lookup implements nbd.Exports: only a writer serves its export.
func (a *Agent) Lookup(name string) (*nbd.Export, error) {
	v := a.get(name)
	if v == nil {
		return nil, fmt.Errorf("no volume %q on node %s", name, a.cfg.Node)
	}
	if err := v.Writable(); err != nil {
		return nil, fmt.Errorf("volume %s is not served here: %v", name, err)
	}
	ns, vol, _ := strings.Cut(name, "/")
	slot := a.clientsSlot(name, a.dir(ns, vol))
	return &nbd.Export{Name: name, Description: "Tandem volume " + name + " on " + a.cfg.Node, Backend: v,
		// Asked again before every request: a client node removed from the
		// restriction can do nothing more on the connection it has.
		Admit: func(addr netip.Addr) error { return slot.Load().admit(addr) }}, nil
}

// List implements nbd.Exports: the exports this node serves now.
func (a *Agent) List() []string {
	var out []string
	for _, v := range a.list() {
		if v.Writable() == nil {
			out = append(out, v.Name())
		}
	}
	return out
}

// ServeReplication accepts replication streams on ln until ctx is done. It
// returns nil then, or the accept error that ended it (not one that passes,
// such as running out of file descriptors: those are retried).
func (a *Agent) ServeReplication(ctx context.Context, ln net.Listener) error {
	a.mu.Lock() // handleInfo reads it concurrently
	if a.replAddr == "" {
		// Only when nothing was advertised (SetAddresses): the listen
		// address may be a wildcard no peer can dial.
		a.replAddr = ln.Addr().String()
	}
	a.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if retryableAccept(err) {
				// Like net/http's Server: back off 5 ms, doubling up to 1 s,
				// so a shortage of file descriptors does not end the
				// listener (and with it every pair's link to this node).
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				a.log.Error(err, "Replication listener: accept failed; retrying", "delay", backoff.String())
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return fmt.Errorf("replication listener: %w", err)
		}
		backoff = 0
		if reason := a.admitReplConn(); reason != "" {
			n := a.replRefused.Add(1)
			a.replRefuseLog.Do(func() {
				a.log.Info("Refusing replication connection: "+reason, "remote", c.RemoteAddr().String(), "refusedTotal", n)
			})
			c.Close()
			continue
		}
		go a.serveReplConn(ctx, c)
	}
}

// admitReplConn counts a new connection as open and handshaking, or returns
// why it cannot be (and counts nothing).
func (a *Agent) admitReplConn() string {
	if n := a.replConns.Add(1); n > int64(a.cfg.MaxReplicationConns) {
		a.replConns.Add(-1)
		return fmt.Sprintf("too many connections (limit %d)", a.cfg.MaxReplicationConns)
	}
	if n := a.replHandshakes.Add(1); n > int64(a.cfg.MaxReplicationHandshakes) {
		a.replHandshakes.Add(-1)
		a.replConns.Add(-1)
		return fmt.Sprintf("too many connections that have not authenticated yet (limit %d)", a.cfg.MaxReplicationHandshakes)
	}
	return ""
}

// retryableAccept reports whether an accept error is a passing condition (a
// shortage of descriptors or buffers, an aborted connection, a timeout)
// rather than a closed or broken listener. The NBD server retries the same.
func retryableAccept(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (a *Agent) serveReplConn(ctx context.Context, c net.Conn) {
	defer a.replConns.Add(-1)
	anonymous := true
	defer func() {
		if anonymous {
			a.replHandshakes.Add(-1)
		}
	}()
	raw := c // c becomes the TLS connection with TLS
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()
	_ = c.SetReadDeadline(time.Now().Add(helloTimeout))
	if a.replTLS != nil {
		// The handshake is bounded by the Hello's deadline; a client
		// without a certificate of the CA bundle, or speaking plaintext,
		// fails it.
		tc := tls.Server(c, a.replTLS)
		hctx, cancel := context.WithTimeout(ctx, helloTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			a.log.Info("Closing replication connection: TLS handshake failed", "remote", c.RemoteAddr().String(), "reason", err.Error())
			c.Close()
			return
		}
		c = tc
	}
	// The Hello is read straight from the connection (two reads: header,
	// payload) with a small payload limit: an anonymous peer announcing a
	// 32 MiB frame is refused before anything is allocated for it.
	rd := repl.NewReader(c, maxHelloPayload)
	log := a.log.WithValues("remote", c.RemoteAddr().String())
	f, err := rd.Next()
	if err != nil {
		log.Info("Closing replication connection: bad first frame", "reason", err.Error())
		c.Close()
		return
	}
	if f.Type != repl.TypeHello {
		log.Info("Closing replication connection: first frame is not Hello", "type", f.Type.String())
		c.Close()
		return
	}
	h, err := repl.ParseHello(f.Payload)
	if err != nil {
		log.Info("Closing replication connection: bad Hello", "reason", err.Error())
		c.Close()
		return
	}
	if !a.tokenOK(h.Token) {
		log.Info("Refusing replication connection: wrong or missing token", "from", h.Node)
		refuseConn(c, f.Epoch, "authentication failed: wrong or missing token")
		return
	}
	if reason := a.replIdentityOK(c, h.Node); reason != "" {
		log.Info("Refusing replication connection: TLS identity is not the Hello's node", "from", h.Node, "reason", reason)
		refuseConn(c, f.Epoch, reason)
		return
	}
	anonymous = false
	a.replHandshakes.Add(-1)
	v := a.get(h.Volume)
	if v == nil {
		reason := fmt.Sprintf("no volume %q on node %s", h.Volume, a.cfg.Node)
		log.Info("Refusing replication connection: unknown volume", "from", h.Node, "reason", reason)
		refuseConn(c, f.Epoch, reason)
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	br := bufio.NewReaderSize(c, replBufferSize)
	rd.Continue(br, 0)
	if err := v.ServePrimary(c, br, rd, h); err != nil {
		log.Info("Replication stream ended", "volume", h.Volume, "reason", err.Error())
	}
}

func refuseConn(c net.Conn, epoch uint64, reason string) {
	bw := bufio.NewWriter(c)
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_ = repl.WriteFrame(bw, &repl.Frame{Type: repl.TypeNack, Epoch: epoch, Payload: []byte(reason)})
	_ = bw.Flush()
	c.Close()
}
