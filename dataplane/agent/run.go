package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-logr/logr"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	coreclient "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/dataplane/nbd"
)

// Options configure Run: the agent itself (Config) and what it serves on.
type Options struct {
	Config

	// Control, Replication and NBD are the listeners of the control API,
	// the replication link and the NBD server; all three are required. Run
	// owns them: they are closed when it returns. The endpoints the agent
	// advertises are their addresses, with Config.AdvertiseHost as the host
	// when it is set (else the listener's host, or 127.0.0.1 for a
	// wildcard).
	Control, Replication, NBD net.Listener
	// ControlLimits bound the control API's connections (zero: defaults).
	ControlLimits ControlLimits
	// NBDAllow decides which clients may connect to the NBD port
	// (nbd.Server.Allow; nil: any). One that admits the cluster's nodes
	// needs Nodes.
	NBDAllow *nbd.AllowList
	// Nodes lets the agent watch the cluster's Nodes for NBDAllow
	// (WatchNodes).
	Nodes coreclient.NodesGetter
	// NBDHandshakeTimeout bounds an NBD client's negotiation (0:
	// nbd.DefaultHandshakeTimeout).
	NBDHandshakeTimeout time.Duration
	// NBDTLS says whether the NBD server offers TLS (NBD_OPT_STARTTLS)
	// with Config.TLS, or requires it. The client must then present a
	// certificate of the CA bundle naming a Tandem identity (the CSI node
	// plugin presents its node's). "" is NBDTLSOffer.
	NBDTLS NBDTLSMode

	// Leases connects the agent to Kubernetes: with it, the agent registers
	// its Lease in Namespace (Register) and renews the authority Leases of
	// the volumes it serves as primary (a KubeAuthority, which gates every
	// volume's writes; Config.Authority must then be nil). Nil: standalone,
	// the control API's word is final (or Config.Authority's).
	Leases    coordclient.LeasesGetter
	Namespace string

	// HandoverTimeout bounds how long a stopping agent waits for the
	// controller to move its writer roles to their peers (handOver; only
	// with Leases, where a controller acts on Status.Stopping). Zero:
	// DefaultHandoverTimeout; negative: no handover.
	HandoverTimeout time.Duration
	// HandoverClientGrace bounds the wait, after a handover, for the NBD
	// clients to disconnect on their own (zero: DefaultHandoverClientGrace).
	HandoverClientGrace time.Duration

	// Started, if set, is called once the agent serves on all three
	// listeners, with the agent and the endpoints it advertises.
	Started func(*Agent, Endpoints)
}

// NBDTLSMode is Options.NBDTLS.
type NBDTLSMode string

// NBD TLS modes.
const (
	// NBDTLSOff: the NBD server does not offer TLS (STARTTLS gets
	// NBD_REP_ERR_UNSUP).
	NBDTLSOff NBDTLSMode = "off"
	// NBDTLSOffer: clients may upgrade with STARTTLS; plain-text clients
	// (qemu, fio, nbdinfo without certificates) are still served.
	NBDTLSOffer NBDTLSMode = "offer"
	// NBDTLSRequire: every client must upgrade with STARTTLS first.
	NBDTLSRequire NBDTLSMode = "require"
)

// ParseNBDTLSMode parses an --nbd-tls value.
func ParseNBDTLSMode(s string) (NBDTLSMode, error) {
	switch m := NBDTLSMode(s); m {
	case NBDTLSOff, NBDTLSOffer, NBDTLSRequire:
		return m, nil
	}
	return "", fmt.Errorf("%q: want off, offer or require", s)
}

// effective is the mode the NBD server runs in: off without TLS material.
func (m NBDTLSMode) effective(haveTLS bool) NBDTLSMode {
	switch {
	case !haveTLS:
		return NBDTLSOff
	case m == "":
		return NBDTLSOffer
	}
	return m
}

// Shutdown timing (Run). At worst the handover (HandoverTimeout, 20 s, and
// the clients' grace, 5 s), nbd.DefaultDrainTimeout+3 s for the NBD
// connections, 2 s for the replication listener, volume.Options'
// CloseTimeout (5 s) plus the last checkpoint for the replicas, 3 s for the
// control API: under the DaemonSet's 60 s grace period.
const (
	nbdStopWait     = nbd.DefaultDrainTimeout + 3*time.Second
	replStopWait    = 2 * time.Second
	controlStopWait = 3 * time.Second
)

// Run assembles an agent (New) and serves it on o's listeners until ctx is
// done or one of them fails, then shuts it down in the order that loses
// nothing:
//
//  0. (ctx done, with Leases) the writer roles move to the peers first
//     (handOver), and the NBD clients get a moment to follow them;
//  1. no new NBD connections; the requests in flight finish (up to the NBD
//     server's drain timeout, then they are cancelled);
//  2. the replication listener stops;
//  3. the replicas close, each waiting for its admitted writes before its
//     final checkpoint, so a write that reached the local disk but not the
//     peer is dirty after a restart;
//  4. the control API stops;
//  5. registration and the authority renewals stop. They outlive the
//     listeners: the writes drained in 1 and 3 still need the authority
//     (else they fail as fenced) until the replicas are closed.
//
// Run returns nil after a shutdown for ctx, or the error of the listener
// that failed. cmd/agent runs it with a context cancelled by SIGTERM; tests
// run in-process agents with it.
func Run(ctx context.Context, o Options) error {
	lns := []net.Listener{o.Control, o.Replication, o.NBD}
	fail := func(err error) error {
		for _, l := range lns {
			if l != nil {
				l.Close()
			}
		}
		return err
	}
	if o.Control == nil || o.Replication == nil || o.NBD == nil {
		return fail(errors.New("agent: Run needs the control, replication and NBD listeners"))
	}
	if o.NBDAllow.Nodes() && o.Nodes == nil {
		return fail(errors.New("agent: an NBD allow-list of the cluster's nodes needs Options.Nodes (Kubernetes)"))
	}
	if o.NBDTLS != "" {
		if _, err := ParseNBDTLSMode(string(o.NBDTLS)); err != nil {
			return fail(fmt.Errorf("agent: Options.NBDTLS %w", err))
		}
	}
	if o.NBDTLS == NBDTLSRequire && o.Config.TLS == nil {
		return fail(errors.New("agent: NBD TLS required (--nbd-tls=require) without TLS material (--tls-dir or --tls-issue)"))
	}
	cfg := o.Config
	log := cfg.Log
	var clockOpts []Option
	if cfg.Clock != nil {
		clockOpts = append(clockOpts, WithClock(cfg.Clock))
	}
	var auth *KubeAuthority
	if o.Leases != nil {
		if cfg.Authority != nil {
			return fail(errors.New("agent: Options.Leases and Config.Authority exclude each other"))
		}
		if o.Namespace == "" {
			return fail(errors.New("agent: Options.Leases needs a Namespace"))
		}
		auth = NewKubeAuthority(o.Leases, o.Namespace, cfg.Node, clockOpts...)
		cfg.Authority = auth
	}
	absDataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return fail(fmt.Errorf("agent: data dir: %w", err))
	}
	a, err := New(cfg)
	if err != nil {
		return fail(err)
	}
	scheme := "http://"
	if cfg.TLS != nil {
		scheme = "https://"
	}
	ep := Endpoints{
		Control:     scheme + advertised(cfg.AdvertiseHost, o.Control.Addr()),
		Replication: advertised(cfg.AdvertiseHost, o.Replication.Addr()),
		NBD:         advertised(cfg.AdvertiseHost, o.NBD.Addr()),
		DataDir:     absDataDir, // named in TeardownIncomplete events
	}
	a.SetAddresses(ep.NBD, ep.Replication, ep.Control)

	// Not derived from ctx: the renewals stop last (step 5).
	leaseCtx, stopLeases := context.WithCancel(context.WithoutCancel(ctx))
	var leaseWG sync.WaitGroup
	defer func() {
		stopLeases()
		leaseWG.Wait()
	}()
	if o.NBDAllow.Nodes() {
		leaseWG.Go(func() { WatchNodes(leaseCtx, o.Nodes, o.NBDAllow, log.WithName("nodes")) })
	}
	if auth != nil {
		leaseWG.Go(func() {
			Register(leaseCtx, o.Leases, o.Namespace, cfg.Node, ep, log.WithName("register"), clockOpts...)
		})
		leaseWG.Go(func() { auth.Run(leaseCtx, a.Primaries, log.WithName("authority")) })
	}

	nbdSrv := &nbd.Server{Exports: a, Log: log.WithName("nbd"), Allow: o.NBDAllow,
		Budget: cfg.Budget, HandshakeTimeout: o.NBDHandshakeTimeout}
	if cfg.TLS != nil && o.NBDTLS != NBDTLSOff {
		nbdSrv.TLS = cfg.TLS.ServerConfig(true)
		nbdSrv.RequireTLS = o.NBDTLS == NBDTLSRequire
	}
	a.nbdTLS = o.NBDTLS.effective(cfg.TLS != nil)
	nbdSvc := startService("NBD server", func(ctx context.Context) error { return nbdSrv.Serve(ctx, o.NBD) })
	replSvc := startService("replication listener", func(ctx context.Context) error { return a.ServeReplication(ctx, o.Replication) })
	ctrlSvc := startService("control API", func(ctx context.Context) error { return a.ServeControl(ctx, o.Control, o.ControlLimits) })
	log.Info("Agent started", "node", cfg.Node, "dataDir", cfg.DataDir, "control", o.Control.Addr().String(),
		"replication", o.Replication.Addr().String(), "nbd", o.NBD.Addr().String(), "auth", a.cfg.Tokens.Enabled(), "tls", cfg.TLS != nil, "nbdTLS", a.nbdTLS,
		"kubernetes", auth != nil, "nbdAllowedClients", o.NBDAllow.String(), "maxInflightBytes", cfg.Budget.Stats().Size)
	if o.Started != nil {
		o.Started(a, ep)
	}

	select {
	case <-ctx.Done():
		log.Info("Shutting down")
		if auth != nil && o.HandoverTimeout >= 0 {
			timeout, grace := o.HandoverTimeout, o.HandoverClientGrace
			if timeout == 0 {
				timeout = DefaultHandoverTimeout
			}
			if grace == 0 {
				grace = DefaultHandoverClientGrace
			}
			var clk clock.Clock = clock.RealClock{}
			if cfg.Clock != nil {
				clk = cfg.Clock
			}
			// Not ctx (done already): the handover is bounded by its timeout.
			a.handOver(context.WithoutCancel(ctx), clk, timeout, grace,
				func() int64 { return nbdSrv.Stats().ConnsActive }, log.WithName("handover"))
		}
	case err = <-nbdSvc.done:
		err = nbdSvc.exited(err)
	case err = <-replSvc.done:
		err = replSvc.exited(err)
	case err = <-ctrlSvc.done:
		err = ctrlSvc.exited(err)
	}
	if err != nil {
		log.Error(err, "Listener failed; shutting down")
	}
	if !nbdSvc.stop(log, nbdStopWait) {
		log.Error(errors.New("NBD connections still open"), "Closing the replicas with NBD requests still running")
	}
	replSvc.stop(log, replStopWait)
	if cerr := a.Close(); cerr != nil {
		log.Error(cerr, "Closing replicas")
	}
	log.Info("Replicas closed")
	ctrlSvc.stop(log, controlStopWait)
	return err
}

// service is a listener's serve loop run in its own goroutine.
type service struct {
	name   string
	cancel context.CancelFunc
	done   chan error
	ended  bool
}

func startService(name string, serve func(ctx context.Context) error) *service {
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{name: name, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- serve(ctx) }()
	return s
}

// exited records that the serve loop returned on its own with err (which
// the caller received), and returns why.
func (s *service) exited(err error) error {
	s.ended = true
	if err == nil {
		err = fmt.Errorf("%s stopped", s.name)
	}
	return err
}

// stop cancels the serve loop and waits up to d for it to return; it
// reports whether it did.
func (s *service) stop(log logr.Logger, d time.Duration) bool {
	s.cancel()
	if s.ended {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case err := <-s.done:
		s.ended = true
		if err != nil {
			log.Error(err, "Stopped with an error", "service", s.name)
		} else {
			log.Info("Stopped", "service", s.name)
		}
		return true
	case <-t.C:
		log.Error(errors.New("still running"), "Gave up waiting", "service", s.name, "after", d.String())
		return false
	}
}

// advertised joins the advertise host (or the listener's own host, or
// 127.0.0.1 for a wildcard) with the listener's port.
func advertised(host string, addr net.Addr) string {
	h, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	if host == "" {
		host = h
		if ip := net.ParseIP(h); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
	}
	return net.JoinHostPort(host, port)
}
