package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/tandem-storage/tandem/internal/fsutil"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// The client restriction of a volume's NBD export (agentapi.Spec.Clients),
// kept in the replica's directory so that an agent that restarts does not
// serve a client the controller fenced before it has heard from the
// controller again:
//
//	<replica dir>/clients.json  {"version":1,"nodes":[...],"addresses":[...],"crc32c":N}
//
// crc32c (Castagnoli) covers the nodes and addresses joined with "\n" (nodes
// first, then a "|" line, then addresses). No file: unrestricted. A file that
// cannot be read or fails its checksum admits nobody until the controller
// sends the restriction again: refusing a client costs a retry, serving a
// fenced one could cost the volume's data.
const clientsFile = "clients.json"

type clientsRecord struct {
	Version   int      `json:"version"`
	Nodes     []string `json:"nodes"`
	Addresses []string `json:"addresses"`
	CRC       uint32   `json:"crc32c"`
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func clientsCRC(c *agentapi.Clients) uint32 {
	return crc32.Checksum([]byte(strings.Join(c.Nodes, "\n")+"\n|\n"+strings.Join(c.Addresses, "\n")), castagnoli)
}

// clientsState is a volume's restriction in force: nil spec is
// unrestricted.
type clientsState struct {
	spec     *agentapi.Clients
	prefixes []netip.Prefix
	damaged  error // the record could not be read: admit nobody
}

// admit says whether a client at addr may use the export.
func (s *clientsState) admit(addr netip.Addr) error {
	switch {
	case s == nil || (s.spec == nil && s.damaged == nil):
		return nil
	case s.damaged != nil:
		return fmt.Errorf("the volume's client restriction is unknown (%v) until the controller sends it again", s.damaged)
	}
	for _, p := range s.prefixes {
		if p.Contains(addr) {
			return nil
		}
	}
	if len(s.spec.Nodes) == 0 {
		return fmt.Errorf("no client node may use the volume now; %s is refused", addr)
	}
	return fmt.Errorf("the volume is used from %s now; %s is refused", strings.Join(s.spec.Nodes, ", "), addr)
}

// reported is the restriction as the agent's status reports it: a damaged
// record reports as admitting nobody (which it does), so that a controller
// whose pair is unrestricted sees the difference and sends its spec again.
func (s *clientsState) reported() *agentapi.Clients {
	if s.damaged != nil {
		return &agentapi.Clients{Nodes: []string{}, Addresses: []string{}}
	}
	return s.spec
}

// parseClients checks a restriction's addresses.
func parseClients(c *agentapi.Clients) ([]netip.Prefix, error) {
	if c == nil {
		return nil, nil
	}
	var out []netip.Prefix
	for _, a := range c.Addresses {
		if p, err := netip.ParsePrefix(a); err == nil {
			out = append(out, p.Masked())
			continue
		}
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return nil, fmt.Errorf("client address %q is neither an IP address nor a CIDR prefix", a)
		}
		out = append(out, netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()))
	}
	return out, nil
}

// loadClients reads a replica's record.
func loadClients(dir string) *clientsState {
	b, err := os.ReadFile(filepath.Join(dir, clientsFile))
	if errors.Is(err, os.ErrNotExist) {
		return &clientsState{}
	}
	if err != nil {
		return &clientsState{damaged: err}
	}
	var r clientsRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return &clientsState{damaged: fmt.Errorf("%s: %w", clientsFile, err)}
	}
	c := &agentapi.Clients{Nodes: r.Nodes, Addresses: r.Addresses}
	if r.Version != 1 || r.CRC != clientsCRC(c) {
		return &clientsState{damaged: fmt.Errorf("%s: version %d or checksum mismatch", clientsFile, r.Version)}
	}
	p, err := parseClients(c)
	if err != nil {
		return &clientsState{damaged: fmt.Errorf("%s: %w", clientsFile, err)}
	}
	return &clientsState{spec: c, prefixes: p}
}

// storeClients persists a restriction (temp, fsync, rename, fsync dir) or
// removes the record when there is none.
func storeClients(dir string, c *agentapi.Clients) error {
	path := filepath.Join(dir, clientsFile)
	if c == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing %s: %w", path, err)
		}
		return fsutil.SyncDir(dir)
	}
	r := clientsRecord{Version: 1, Nodes: c.Nodes, Addresses: c.Addresses, CRC: clientsCRC(c)}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, b, 0o600)
}

// clientsSlot returns the holder of a volume's restriction, loading it from
// the replica's directory the first time. The NBD path reads it without a
// lock (every request asks).
func (a *Agent) clientsSlot(key, dir string) *atomic.Pointer[clientsState] {
	a.clientsMu.Lock()
	defer a.clientsMu.Unlock()
	if a.clients == nil {
		a.clients = map[string]*atomic.Pointer[clientsState]{}
	}
	p, ok := a.clients[key]
	if !ok {
		p = &atomic.Pointer[clientsState]{}
		p.Store(loadClients(dir))
		a.clients[key] = p
	}
	return p
}

// clientsOf returns a volume's restriction in force.
func (a *Agent) clientsOf(key, dir string) *clientsState { return a.clientsSlot(key, dir).Load() }

// setClients makes c the volume's restriction, durably before it is in
// force (a restart must not lose a fence). Calls for one volume are
// serialised by the control API's handling of that volume.
func (a *Agent) setClients(key, dir string, c *agentapi.Clients) error {
	slot := a.clientsSlot(key, dir)
	cur := slot.Load()
	if cur.damaged == nil && cur.spec.Equal(c) {
		return nil
	}
	prefixes, err := parseClients(c)
	if err != nil {
		return err
	}
	if c != nil {
		c = &agentapi.Clients{Nodes: slices.Clone(c.Nodes), Addresses: slices.Clone(c.Addresses)}
		if c.Nodes == nil {
			c.Nodes = []string{}
		}
		if c.Addresses == nil {
			c.Addresses = []string{}
		}
	}
	if err := storeClients(dir, c); err != nil {
		return fmt.Errorf("recording the client restriction: %w", err)
	}
	slot.Store(&clientsState{spec: c, prefixes: prefixes})
	return nil
}

// forgetClients drops a removed volume's restriction from memory.
func (a *Agent) forgetClients(key string) {
	a.clientsMu.Lock()
	delete(a.clients, key)
	a.clientsMu.Unlock()
}
