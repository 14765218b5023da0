// Package attach makes a Tandem volume a block device on a node, two ways:
// the kernel's NBD client (Kernel: /dev/nbdN, the socket handed to the
// kernel after Tandem's handshake, replaced when the writer moves), and for
// kernels without one the user-space path (UserSpace: a Follower, an NBD
// client that follows the pair's writer, behind a FUSE file, with a loop
// device on that file).
package attach

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/nbd"
)

// Resolver returns the nbd:// URI of the export that serves the volume now
// (the VolumePair's status.endpoint), or an error while there is none.
type Resolver func(ctx context.Context) (string, error)

// DefaultIOTimeout is how long one request keeps retrying towards the
// writer before it fails with EIO: a failover with the default settings
// takes under 15 s, a manager's loss adds a leader election; two minutes
// covers both with room, and is what Linux's NBD and iSCSI initiators wait.
const DefaultIOTimeout = 2 * time.Minute

// Follower reads and writes a volume through whichever member is its writer
// now. A request that fails because the member it went to is no longer the
// writer (refused, not the writer, shutting down, the connection lost) is
// re-issued to the member the VolumePair names next, until IOTimeout; the
// filesystem above sees a slow request, not an error. Re-issuing is safe:
// a write carries its data and offset, so writing it twice leaves the same
// bytes.
type Follower struct {
	// Resolve names the current writer's export.
	Resolve Resolver
	// IOTimeout bounds one request's retries (default DefaultIOTimeout).
	IOTimeout time.Duration
	Log       logr.Logger
	// TLS, when set, upgrades every connection with NBD_OPT_STARTTLS.
	TLS TLSConfig

	mu       sync.Mutex
	c        *nbd.Client
	endpoint string
	closed   bool
	// size is the export's size as the connection c negotiated it.
	size int64
	// renew makes the next request connect anew (Refresh).
	renew bool

	reconnects atomic.Uint64
}

// Endpoint is the export the follower is connected to ("" when none).
func (f *Follower) Endpoint() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.endpoint
}

// Reconnects counts the connections made after the first.
func (f *Follower) Reconnects() uint64 { return f.reconnects.Load() }

// Size is the export's size as the current connection negotiated it (0
// before the first).
func (f *Follower) Size() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.size
}

// Refresh connects to the current writer anew and returns the export's
// size as the new connection negotiates it: NBD has no in-band resize, a
// connection keeps the size it was opened with, so this is how the
// follower learns that the volume grew. The old connection is closed once
// the new one is up; its requests in flight are re-issued on the new one,
// as after a writer's move.
func (f *Follower) Refresh(ctx context.Context) (int64, error) {
	f.mu.Lock()
	f.renew = true
	f.mu.Unlock()
	size, err := f.Connect(ctx)
	if err != nil {
		f.mu.Lock()
		f.renew = false // keep the connection there is
		f.mu.Unlock()
	}
	return size, err
}

// Connect dials the current writer now and returns the export's size.
func (f *Follower) Connect(ctx context.Context) (int64, error) {
	var size int64
	err := f.do(ctx, "connect", func(c *nbd.Client) error { size = c.Size(); return nil })
	return size, err
}

// ReadAt reads len(p) bytes at off.
func (f *Follower) ReadAt(ctx context.Context, p []byte, off int64) error {
	return f.do(ctx, "read", func(c *nbd.Client) error { return c.ReadAt(ctx, p, off) })
}

// WriteAt writes p at off (durably before it returns with fua).
func (f *Follower) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return f.do(ctx, "write", func(c *nbd.Client) error { return c.WriteAt(ctx, p, off, fua) })
}

// Flush makes every acknowledged write durable.
func (f *Follower) Flush(ctx context.Context) error {
	return f.do(ctx, "flush", func(c *nbd.Client) error { return c.Flush(ctx) })
}

// Close disconnects; later requests fail.
func (f *Follower) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	if f.c != nil {
		_ = f.c.Close()
		f.c = nil
	}
}

var errFollowerClosed = errors.New("volume detached")

// client returns the connection to the current writer, dialling it when
// there is none.
func (f *Follower) client(ctx context.Context) (*nbd.Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errFollowerClosed
	}
	if f.c != nil && f.c.Err() == nil && !f.renew {
		return f.c, nil
	}
	uri, err := f.Resolve(ctx)
	if err != nil {
		return nil, fmt.Errorf("finding the writer: %w", err)
	}
	addr, name, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	opts, err := clientOptions(f.TLS)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := nbd.Dial(dctx, addr, name, opts...)
	if err != nil {
		return nil, err
	}
	switch {
	case f.renew:
		if f.c != nil {
			_ = f.c.Close() // its requests are re-issued on c
		}
		f.reconnects.Add(1)
		f.Log.Info("Connected anew", "writer", uri, "size", c.Size(), "previousSize", f.size)
	case f.endpoint != "":
		f.reconnects.Add(1)
		f.Log.Info("Following the writer", "from", f.endpoint, "to", uri)
	}
	f.c, f.endpoint, f.size, f.renew = c, uri, c.Size(), false
	return c, nil
}

// drop forgets c after it failed, so that the next request dials again.
func (f *Follower) drop(c *nbd.Client) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.c == c {
		_ = c.Close()
		f.c = nil
	}
}

// retryable says whether err may go away with another writer or another
// try: refusals and lost connections do; invalid or out-of-space requests
// do not.
func retryable(err error, c *nbd.Client) bool {
	if errors.Is(err, errFollowerClosed) {
		return false
	}
	for _, e := range []error{syscall.EINVAL, syscall.ENOSPC, syscall.EROFS, syscall.ENOTSUP} {
		if errors.Is(err, e) && (c == nil || c.Err() == nil) {
			return false // the request itself cannot succeed
		}
	}
	var ce *nbd.CommandError
	if errors.As(err, &ce) && (c == nil || c.Err() == nil) {
		switch ce.Errno2() {
		case syscall.EPERM, syscall.ESHUTDOWN, syscall.EIO:
			return true // not the writer (any more), stopping, a failing disk
		default:
			return false
		}
	}
	return true // dial, handshake and connection errors
}

func (f *Follower) do(ctx context.Context, what string, op func(*nbd.Client) error) error {
	timeout := f.IOTimeout
	if timeout <= 0 {
		timeout = DefaultIOTimeout
	}
	deadline := time.Now().Add(timeout)
	backoff := 50 * time.Millisecond
	var last error
	for attempt := 0; ; attempt++ {
		c, err := f.client(ctx)
		if err == nil {
			err = op(c)
			if err == nil {
				return nil
			}
			if !retryable(err, c) {
				return err
			}
			f.drop(c)
		} else if !retryable(err, nil) {
			return err
		}
		// Each new reason once, at info: an operator sees why a volume's
		// I/O waits (no writer yet, a refused TLS upgrade...) without a
		// line per retry.
		if last == nil || err.Error() != last.Error() {
			f.Log.Info("Volume request will be re-issued", "op", what, "attempt", attempt, "error", err.Error())
		}
		last = err
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w (last error: %w)", what, context.Cause(ctx), last)
		}
		if time.Now().Add(backoff).After(deadline) {
			f.Log.Error(last, "Volume request failed: no writer answered in time; the filesystem gets EIO", "op", what, "timeout", timeout.String())
			return fmt.Errorf("%s: no writer answered within %s: %w: %w", what, timeout, last, syscall.EIO)
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
		}
		backoff = min(2*backoff, time.Second)
	}
}

// ParseURI splits an nbd:// URI (the VolumePair's status.endpoint) into the
// server's address and the export name.
func ParseURI(uri string) (addr, name string, err error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "nbd" || u.Host == "" {
		return "", "", fmt.Errorf("endpoint %q is not an nbd://host:port/export URI", uri)
	}
	name = strings.TrimPrefix(u.Path, "/")
	host := u.Host
	if u.Port() == "" {
		host += ":10809"
	}
	return host, name, nil
}
