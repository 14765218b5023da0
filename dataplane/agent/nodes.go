package agent

import (
	"context"
	"net/netip"
	"slices"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	coreclient "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/tandem-storage/tandem/dataplane/nbd"
)

// WatchNodes keeps list's node networks (nbd.AllowList.SetNodes) equal to
// the cluster's Nodes: every address a Node reports and its Pod CIDRs, so
// the NBD port admits the cluster's nodes and their Pods and no one else
// (--nbd-allowed-clients=nodes, the default with Kubernetes). It runs until
// ctx is done. Until the first list arrives, no node is admitted (loopback
// is); a Node added later is admitted as soon as the watch delivers it.
// Reading Nodes needs the agent's ClusterRole (config/rbac/agent_role.yaml).
func WatchNodes(ctx context.Context, nodes coreclient.NodesGetter, list *nbd.AllowList, log logr.Logger) {
	lw := cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return nodes.Nodes().List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return nodes.Nodes().Watch(ctx, o)
		},
	}, nodes)
	var store cache.Store
	var last []netip.Prefix
	update := func() {
		nets := NodeNetworks(store.List())
		if !slices.Equal(nets, last) {
			list.SetNodes(nets)
			log.Info("NBD clients admitted", "allowedClients", list.String())
			last = nets
		}
	}
	store, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw, ObjectType: &corev1.Node{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { update() },
			UpdateFunc: func(any, any) { update() },
			DeleteFunc: func(any) { update() },
		},
	})
	ctrl.RunWithContext(ctx)
}

// NodeNetworks is every address and Pod CIDR of the Nodes, sorted, without
// duplicates.
func NodeNetworks(objs []any) []netip.Prefix {
	var out []netip.Prefix
	for _, o := range objs {
		n, ok := o.(*corev1.Node)
		if !ok {
			continue
		}
		for _, a := range n.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil {
				ip = ip.Unmap()
				out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
			}
		}
		cidrs := n.Spec.PodCIDRs
		if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
			cidrs = []string{n.Spec.PodCIDR}
		}
		for _, c := range cidrs {
			if p, err := netip.ParsePrefix(c); err == nil {
				out = append(out, p.Masked())
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}
