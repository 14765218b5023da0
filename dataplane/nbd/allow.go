package nbd

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
)

// AllowList is the set of client addresses the NBD port admits: fixed
// networks, plus (with "nodes") this node's loopback and the cluster's
// nodes, kept current by whoever watches them (SetNodes). A nil *AllowList
// admits everyone.
//
// Parsed from the agent's --nbd-allowed-clients: "nodes" (the default with
// Kubernetes: every Node's addresses and Pod CIDRs), "any" (everyone), and
// CIDR prefixes or single addresses, comma-separated.
type AllowList struct {
	fixed []netip.Prefix
	any   bool
	nodes bool
	// nodeNets are the nodes' networks (SetNodes); nil until the first
	// list arrived, which admits no node yet.
	nodeNets atomic.Pointer[[]netip.Prefix]
}

// NewAllowList admits the fixed networks, and the nodes when nodes is true
// (SetNodes).
func NewAllowList(fixed []netip.Prefix, nodes bool) *AllowList {
	return &AllowList{fixed: slices.Clone(fixed), nodes: nodes, any: !nodes && len(fixed) == 0}
}

// ParseAllowList parses a --nbd-allowed-clients value. "" is "any" (the
// behaviour before the default became "nodes").
func ParseAllowList(list string) (*AllowList, error) {
	a := &AllowList{}
	for _, f := range strings.Split(list, ",") {
		switch f = strings.TrimSpace(f); f {
		case "":
		case "any":
			a.any = true
		case "nodes":
			a.nodes = true
		default:
			p, err := ParseAllowedClients(f)
			if err != nil {
				return nil, fmt.Errorf("%w (or the keywords nodes, any)", err)
			}
			a.fixed = append(a.fixed, p...)
		}
	}
	if !a.nodes && len(a.fixed) == 0 {
		a.any = true
	}
	if a.any && (a.nodes || len(a.fixed) > 0) {
		return nil, fmt.Errorf("%q: any admits every client; list nothing else with it", list)
	}
	return a, nil
}

// Any reports whether every client is admitted.
func (a *AllowList) Any() bool { return a == nil || a.any }

// Nodes reports whether the cluster's nodes are admitted (SetNodes keeps
// their addresses).
func (a *AllowList) Nodes() bool { return a != nil && a.nodes }

// SetNodes replaces the nodes' networks: their addresses (as /32 or /128)
// and Pod CIDRs.
func (a *AllowList) SetNodes(nets []netip.Prefix) {
	c := slices.Clone(nets)
	a.nodeNets.Store(&c)
}

// Allowed reports whether a client at addr may connect.
func (a *AllowList) Allowed(addr netip.Addr) bool {
	if a.Any() {
		return true
	}
	addr = addr.Unmap()
	if a.nodes && addr.IsLoopback() {
		return true // this node
	}
	for _, p := range a.fixed {
		if p.Contains(addr) {
			return true
		}
	}
	if n := a.nodeNets.Load(); a.nodes && n != nil {
		for _, p := range *n {
			if p.Contains(addr) {
				return true
			}
		}
	}
	return false
}

// String describes the list for logs and refusals.
func (a *AllowList) String() string {
	if a.Any() {
		return "any client"
	}
	var parts []string
	if a.nodes {
		n := 0
		if l := a.nodeNets.Load(); l != nil {
			n = len(*l)
		}
		parts = append(parts, fmt.Sprintf("the cluster's nodes (%d addresses and Pod CIDRs, and loopback)", n))
	}
	for _, p := range a.fixed {
		parts = append(parts, p.String())
	}
	return strings.Join(parts, ", ")
}
