package nbd

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
)

// Backend is one export's I/O. ctx is cancelled when the client's connection
// closes (or a shutdown's drain time is up); a Backend that holds a request
// (for example during a planned failback) must give up when ctx is done and
// return ctx.Err(). Offsets and lengths are checked against Size before a
// Backend sees them. Implementations must be safe for concurrent use: several
// requests, and several connections, run at once.
type Backend interface {
	// Size is the export size in bytes. It may grow (online volume
	// expansion): each connection keeps the size it negotiated, and a
	// new connection sees the new size. It must never shrink.
	Size() int64
	// ReadAt fills p from offset off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off; with fua the data is durable before it returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every write that completed before the call durable, across
	// all connections (the server advertises NBD_FLAG_CAN_MULTI_CONN).
	Flush(ctx context.Context) error
	// Trim tells the backend [off, off+n) is no longer needed; its contents
	// are unspecified afterwards. With fua the effect is durable on return.
	Trim(ctx context.Context, off, n int64, fua bool) error
	// WriteZeroes makes [off, off+n) read as zeroes, keeping it allocated
	// (this is how NBD_CMD_FLAG_NO_HOLE is honoured). With fua the zeroes are
	// durable on return.
	WriteZeroes(ctx context.Context, off, n int64, fua bool) error
}

// ZeroPuncher is implemented by backends that can zero a range by
// deallocating it (later reads return zeroes). The server calls PunchZeroes
// for NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE; with the flag, or
// for backends without this method, it calls Backend.WriteZeroes.
type ZeroPuncher interface {
	PunchZeroes(ctx context.Context, off, n int64, fua bool) error
}

// BufferTaker is implemented by backends that can keep a WRITE's payload
// buffer instead of copying it (a replicating backend queues it for its
// peer). The server then calls WriteAtTake instead of Backend.WriteAt: the
// backend owns *buf from the call on, may keep it after returning, and must
// call done(buf) exactly once when it no longer needs it, whatever the
// outcome. The server never touches the buffer again.
type BufferTaker interface {
	WriteAtTake(ctx context.Context, buf *[]byte, done func(*[]byte), off int64, fua bool) error
}

// Export is what a client gets for an export name ("<namespace>/<name>").
type Export struct {
	// Name is the canonical name reported in NBD_INFO_NAME; the requested
	// name is used when empty.
	Name string
	// Description is reported in NBD_INFO_DESCRIPTION.
	Description string
	Backend     Backend
	// ReadOnly advertises NBD_FLAG_READ_ONLY; writes, trims and zeroes get EPERM.
	ReadOnly bool
	// Block size constraints (NBD_INFO_BLOCK_SIZE). Zero means the default:
	// 1, 4096 and 32 MiB. MaxBlock is capped at Server.MaxPayload.
	MinBlock, PrefBlock, MaxBlock uint32
	// Admit, when set, says whether the client at an address may use the
	// export. It is asked at negotiation (a refusal is NBD_REP_ERR_POLICY
	// with its text) and before every request of an established connection
	// (a refusal fails the request with EPERM): a client the export's owner
	// stops admitting can do nothing more on a connection it already has.
	// Nil admits every client.
	Admit func(client netip.Addr) error
}

// ErrNotAdmitted wraps an Export.Admit refusal of a request: the client sees
// EPERM.
var ErrNotAdmitted = fmt.Errorf("client not admitted to this export: %w", syscall.EPERM)

// clientAddr is the IP address of a connection's peer (the zero Addr when
// it has none, e.g. a pipe).
func clientAddr(a net.Addr) netip.Addr {
	if a == nil {
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// Default block sizes.
const (
	DefaultMinBlock  = 1
	DefaultPrefBlock = 4096
	DefaultMaxBlock  = 32 << 20
)

// blockSizes returns the export's block size constraints with defaults
// applied and MaxBlock capped at maxPayload, or an error if they are not
// valid for the protocol.
func (e *Export) blockSizes(maxPayload uint32) (minB, prefB, maxB uint32, err error) {
	minB, prefB, maxB = e.MinBlock, e.PrefBlock, e.MaxBlock
	if minB == 0 {
		minB = DefaultMinBlock
	}
	if prefB == 0 {
		prefB = max(DefaultPrefBlock, minB)
	}
	if maxB == 0 {
		maxB = DefaultMaxBlock
	}
	if maxB > maxPayload {
		maxB = maxPayload
	}
	if maxB < prefB && maxB >= minB {
		// Capped below the preferred size: prefer the largest power of two
		// that still fits.
		prefB = 1 << (bits.Len32(maxB) - 1)
		prefB = max(prefB, minB)
	}
	switch {
	case bits.OnesCount32(minB) != 1 || minB > 64<<10:
		return 0, 0, 0, fmt.Errorf("minimum block size %d is not a power of two up to 64 KiB", minB)
	case bits.OnesCount32(prefB) != 1 || prefB < minB:
		return 0, 0, 0, fmt.Errorf("preferred block size %d is not a power of two at least the minimum %d", prefB, minB)
	case maxB < prefB || maxB%minB != 0:
		return 0, 0, 0, fmt.Errorf("maximum block size %d is not a multiple of the minimum %d at least the preferred %d", maxB, minB, prefB)
	}
	return minB, prefB, maxB, nil
}

// Exports resolves export names.
type Exports interface {
	// Lookup returns the export for name, or an error explaining the refusal
	// (e.g. "member node-b is the backup, not the writer (epoch 3)"). The
	// error's text is sent to the client and logged. name is "" when the
	// client asks for the default export. Wrap ErrPolicy or ErrShuttingDown
	// to choose NBD_REP_ERR_POLICY or NBD_REP_ERR_SHUTDOWN; any other error is
	// sent as NBD_REP_ERR_UNKNOWN.
	Lookup(name string) (*Export, error)
	// List returns the names announced by NBD_OPT_LIST.
	List() []string
}

// StaticExports is a concurrency-safe, map-backed Exports. Its zero value is
// empty and ready to use.
type StaticExports struct {
	mu      sync.RWMutex
	exports map[string]*Export
	refused map[string]error
	// def is the name served for the empty export name; "" means none.
	def string
}

var _ Exports = (*StaticExports)(nil)

// Add makes e available as name, replacing any previous export or refusal.
func (s *StaticExports) Add(name string, e *Export) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports == nil {
		s.exports = make(map[string]*Export)
	}
	s.exports[name] = e
	delete(s.refused, name)
}

// Refuse makes Lookup(name) fail with err. Refused names are not listed:
// clients such as nbdinfo --list connect to every listed name.
func (s *StaticExports) Refuse(name string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refused == nil {
		s.refused = make(map[string]error)
	}
	s.refused[name] = err
	delete(s.exports, name)
}

// Remove forgets name. Connections already using it are not affected.
func (s *StaticExports) Remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.exports, name)
	delete(s.refused, name)
}

// SetDefault makes the empty export name resolve to name ("" for none).
func (s *StaticExports) SetDefault(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.def = name
}

// Lookup implements Exports.
func (s *StaticExports) Lookup(name string) (*Export, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if name == "" {
		if s.def == "" {
			return nil, fmt.Errorf("%w: no default export, give an export name", ErrUnknownExport)
		}
		name = s.def
	}
	if err, ok := s.refused[name]; ok {
		return nil, err
	}
	e, ok := s.exports[name]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownExport, name)
	}
	return e, nil
}

// List implements Exports: the names that are served, sorted.
func (s *StaticExports) List() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	names := make([]string, 0, len(s.exports))
	for n := range s.exports {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// lookupReply maps a Lookup error to the option reply type.
func lookupReply(err error) uint32 {
	switch {
	case errors.Is(err, ErrPolicy):
		return repErrPolicy
	case errors.Is(err, ErrShuttingDown):
		return repErrShutdown
	default:
		return repErrUnknown
	}
}
