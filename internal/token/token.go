// Package token owns the bearer token the manager, the agents and the
// kubectl plugin share for the agents' control API and replication links:
// how its file is read, reloaded while a process runs, and rotated.
//
// The file (a key of the Secret tandem-agent-token, mounted into the manager
// and the agents) holds one token per line. The first line is the one a
// process sends; every line is accepted. A rotation therefore needs no
// restart and never refuses a peer:
//
//  1. the Secret holds "OLD\nNEW": everyone still sends OLD, and accepts NEW;
//  2. once every process has reloaded it (the kubelet updates a mounted
//     Secret within about a minute; Source.Watch notices within its
//     interval; the agents log "Token file reloaded"), "NEW\nOLD": everyone
//     sends NEW, and still accepts OLD from those that have not reloaded;
//  3. once everyone has reloaded that, "NEW".
//
// A file that cannot be read, or holds no token, leaves the tokens as they
// were (a Secret being rewritten must not lock everyone out).
package token

import (
	"bytes"
	"context"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// ReloadEvery is how often the manager and the agents read the token file
// again (Watch).
const ReloadEvery = 5 * time.Second

// Source is the current set of tokens. A nil *Source, or one without
// tokens, has authentication off: it sends nothing and accepts anything.
type Source struct {
	path string
	cur  atomic.Pointer[[]string]
	raw  atomic.Pointer[[]byte] // the file's content last loaded
}

// Static is a Source of fixed tokens (tests, a token given on the command
// line); "" has none.
func Static(tokens ...string) *Source {
	s := &Source{}
	var list []string
	for _, t := range tokens {
		if t != "" {
			list = append(list, t)
		}
	}
	s.cur.Store(&list)
	return s
}

// FromFile reads the tokens of path; the file must hold at least one.
func FromFile(path string) (*Source, error) {
	s := &Source{path: path}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Parse returns the tokens of a file's content: one per line, blank lines
// and surrounding space ignored.
func Parse(b []byte) []string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// Reload reads the file again. It reports whether the tokens changed; on an
// error, or a file without tokens, they stay as they were.
func (s *Source) Reload() (bool, error) {
	b, err := os.ReadFile(s.path)
	if err != nil {
		return false, fmt.Errorf("read token file: %w", err)
	}
	if old := s.raw.Load(); old != nil && bytes.Equal(*old, b) {
		return false, nil
	}
	list := Parse(b)
	if len(list) == 0 {
		return false, fmt.Errorf("token file %s holds no token", s.path)
	}
	s.raw.Store(&b)
	s.cur.Store(&list)
	return true, nil
}

// Watch reloads the file every interval until ctx is done, logging each
// change (never the tokens) and each failure once.
func (s *Source) Watch(ctx context.Context, interval time.Duration, log logr.Logger) {
	if s == nil || s.path == "" {
		return
	}
	fsutil.PollReload(ctx, clock.RealClock{}, interval, s.Reload,
		func(err error) {
			log.Error(err, "Cannot reload the token file; keeping the tokens loaded before", "path", s.path)
		},
		func() { log.Info("Token file reloaded", "path", s.path, "tokens", len(s.list())) })
}

func (s *Source) list() []string {
	if s == nil {
		return nil
	}
	if l := s.cur.Load(); l != nil {
		return *l
	}
	return nil
}

// Enabled reports whether authentication is on (some token is set).
func (s *Source) Enabled() bool { return len(s.list()) > 0 }

// Send is the token to present: the file's first.
func (s *Source) Send() string {
	if l := s.list(); len(l) > 0 {
		return l[0]
	}
	return ""
}

// Accept reports whether got is one of the tokens (in constant time for
// each); with authentication off, anything is.
func (s *Source) Accept(got string) bool {
	l := s.list()
	if len(l) == 0 {
		return true
	}
	ok := 0
	for _, t := range l {
		ok |= subtle.ConstantTimeCompare([]byte(got), []byte(t))
	}
	return ok == 1
}
