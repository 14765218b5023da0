package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/budget"
)

// Server defaults.
const (
	DefaultMaxInFlight      = 64
	DefaultMaxInFlightBytes = 128 << 20
	DefaultMaxPayload       = 32 << 20
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultWriteTimeout     = 60 * time.Second
	DefaultDrainTimeout     = 10 * time.Second
)

// Server serves NBD exports. The zero value plus Exports is usable; fields
// must not change once serving has started. One Server may serve several
// listeners and connections at once.
type Server struct {
	// Exports resolves the export names clients ask for.
	Exports Exports
	// Log receives connection events; the zero Logger discards them.
	Log logr.Logger
	// MaxInFlight bounds the requests being served at once per connection
	// (default 64). The server stops reading a connection while it is full.
	MaxInFlight int
	// MaxInFlightBytes bounds the payload bytes (write data and read
	// buffers) held at once per connection (default 128 MiB); a single
	// request is always admitted.
	MaxInFlightBytes int64
	// Budget, when set, bounds the payload bytes held at once by every
	// connection together (and by whatever else shares it, see package
	// budget). A request waits for its bytes before its payload is read
	// (WRITE) or its buffer allocated (READ), after the per-connection
	// limits; it fails only if the connection goes away meanwhile. A write
	// buffer handed over to a BufferTaker stays charged until the taker
	// gives it back.
	Budget *budget.Budget
	// MaxPayload is the largest READ or WRITE length accepted (default
	// 32 MiB). A longer READ gets EINVAL; a longer WRITE gets EINVAL and
	// closes the connection, since its payload cannot be skipped safely.
	MaxPayload uint32
	// HandshakeTimeout bounds the whole negotiation phase (default 10s):
	// idle or slow clients are dropped.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds writing one reply (default 60s); a client that
	// stops reading its replies is dropped.
	WriteTimeout time.Duration
	// DrainTimeout bounds how long a shutdown, or a connection being closed
	// for a protocol violation, waits for requests in flight before
	// cancelling their contexts (default 10s).
	DrainTimeout time.Duration
	// Allow decides which client addresses may connect; a connection from
	// any other address is closed before the handshake, with a logged
	// reason. NBD has no authentication of its own here, so this (with a
	// firewall) is what keeps other hosts away from the exports. Nil
	// admits every address.
	Allow *AllowList
	// TLS, when set, offers NBD_OPT_STARTTLS: after its acknowledgement the
	// connection becomes a TLS server connection with this config (which
	// decides the certificates presented and which client certificates are
	// taken) and the negotiation carries on inside it. Nil: STARTTLS gets
	// NBD_REP_ERR_UNSUP.
	TLS *tls.Config
	// RequireTLS refuses every option but NBD_OPT_STARTTLS and
	// NBD_OPT_ABORT before TLS is up (NBD_REP_ERR_TLS_REQD;
	// NBD_OPT_EXPORT_NAME, which cannot carry an error, closes the
	// connection). It needs TLS.
	RequireTLS bool

	stats serverStats
}

// allowed reports whether a client at addr may connect.
func (s *Server) allowed(addr net.Addr) bool {
	if s.Allow.Any() {
		return true
	}
	ap, err := netip.ParseAddrPort(addr.String())
	return err == nil && s.Allow.Allowed(ap.Addr())
}

// ParseAllowedClients parses a comma-separated list of CIDR prefixes or
// single addresses ("10.0.0.0/8,192.168.1.7"), as ParseAllowList takes
// them.
func ParseAllowedClients(list string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(list, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if p, err := netip.ParsePrefix(f); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("nbd: allowed client %q is neither an address nor a CIDR prefix", f)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

func (s *Server) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return DefaultMaxInFlight
}

func (s *Server) maxInFlightBytes() int64 {
	if s.MaxInFlightBytes > 0 {
		return s.MaxInFlightBytes
	}
	return DefaultMaxInFlightBytes
}

func (s *Server) maxPayload() uint32 {
	if s.MaxPayload > 0 {
		return s.MaxPayload
	}
	return DefaultMaxPayload
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return DefaultWriteTimeout
}

func (s *Server) drainTimeout() time.Duration {
	if s.DrainTimeout > 0 {
		return s.DrainTimeout
	}
	return DefaultDrainTimeout
}

// aLongTimeAgo is a deadline in the past, used to interrupt blocked I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Serve accepts connections on ln and serves each in its own goroutine. It
// returns nil once ctx is done, or the accept error (wrapping net.ErrClosed
// if ln was closed by someone else). Either way it closes ln, shuts down
// every connection it accepted (finishing their requests in flight, see
// DrainTimeout) and waits for them before returning.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.Exports == nil {
		return errors.New("nbd: Server.Exports is nil")
	}
	if s.RequireTLS && s.TLS == nil {
		return errors.New("nbd: Server.RequireTLS without Server.TLS")
	}
	connCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	defer ln.Close()

	s.Log.Info("Serving NBD", "addr", ln.Addr().String())
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if retryableAccept(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.Log.Error(err, "Accept failed; retrying", "delay", backoff.String())
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return fmt.Errorf("nbd: accepting on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.ServeConn(connCtx, nc)
		}()
	}
}

// retryableAccept reports whether an accept error is a passing condition
// (resource shortage, aborted connection, timeout) rather than a closed
// listener.
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

// ServeConn runs the NBD protocol on one connection until the client
// disconnects, a protocol violation closes it, or ctx is done (then requests
// in flight are finished first). It always closes c. It returns nil when the
// session ended normally (NBD_CMD_DISC, NBD_OPT_ABORT, the client closing,
// shutdown) and otherwise the reason the connection was dropped; that reason
// is also logged.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	s.stats.connsTotal.Add(1)
	s.stats.connsActive.Add(1)
	defer s.stats.connsActive.Add(-1)
	defer c.Close()

	remote := "unknown"
	if a := c.RemoteAddr(); a != nil {
		remote = a.String()
	}
	log := s.Log.WithValues("remote", remote)
	if a := c.RemoteAddr(); a != nil && !s.allowed(a) {
		s.stats.refused.Add(1)
		err := errors.New("nbd: client address not in the allowed clients")
		log.Info("Refusing NBD connection: client address not allowed (the agent's --nbd-allowed-clients)", "allowedClients", s.Allow.String())
		return err
	}
	if s.Exports == nil || (s.RequireTLS && s.TLS == nil) {
		err := errors.New("nbd: Server.Exports is nil, or RequireTLS is set without TLS")
		log.Error(err, "Refusing connection")
		return err
	}
	br := bufio.NewReaderSize(c, 64<<10)
	neg, err := s.negotiate(ctx, c, br, log)
	if err != nil {
		if ctx.Err() != nil {
			log.V(1).Info("Connection closed during negotiation: shutting down")
			return nil
		}
		if errors.Is(err, ErrProtocol) {
			s.stats.protocolErrors.Add(1)
		}
		log.Error(err, "Closing connection during negotiation")
		return err
	}
	if neg.exp == nil {
		log.V(1).Info("Client aborted negotiation")
		return nil
	}
	if neg.c != c {
		log = log.WithValues("peer", PeerName(neg.c.(*tls.Conn).ConnectionState()))
	}
	return s.transmit(ctx, neg.c, neg.br, neg.exp, neg.size, log.WithValues("export", neg.name))
}
