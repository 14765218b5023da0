package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"slices"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// agentDialTLS returns the TLS config the manager dials the agent at addr
// (host:port) with: it presents the manager's certificate, and the agent's
// must name the node whose agent Lease advertises https://addr as its
// control endpoint, so that an agent holding another node's certificate
// cannot answer for a node. When no Lease names the address (not expected:
// the manager finds agents through their Leases) any node's identity of the
// CA is taken; when several do (a stale Lease), any of their nodes is.
func agentDialTLS(src *tlsid.Source, leases client.Reader, namespace string) func(ctx context.Context, addr string) (*tls.Config, error) {
	return func(ctx context.Context, addr string) (*tls.Config, error) {
		var list coordinationv1.LeaseList
		if err := leases.List(ctx, &list, client.InNamespace(namespace), client.MatchingLabels{v1.LabelComponent: "agent"}); err != nil {
			return nil, fmt.Errorf("finding the node of the agent at %s: list Leases: %w", addr, err)
		}
		var want []string
		for _, l := range list.Items {
			if l.Annotations[v1.AnnControlEndpoint] == "https://"+addr && l.Spec.HolderIdentity != nil && l.Name == v1.AgentLeaseName(*l.Spec.HolderIdentity) {
				want = append(want, *l.Spec.HolderIdentity)
			}
		}
		return src.ClientConfig(func(id tlsid.Identity) error {
			node, ok := id.Node()
			switch {
			case !ok:
				return fmt.Errorf("the agent at %s presented %s, not a node's identity", addr, id)
			case len(want) > 0 && !slices.Contains(want, node):
				return fmt.Errorf("the agent at %s presented the identity of node %s, but that address is the agent of %s (its Lease)", addr, node, strings.Join(want, ", "))
			}
			return nil
		}), nil
	}
}
