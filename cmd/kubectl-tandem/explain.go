package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Messages for what a user gets wrong first: a pair or namespace that does
// not exist, a cluster without Tandem, an API server that cannot be reached.
// Each says the cause and what to do; the API server's error stays wrapped
// at the end.

// explainAPIError adds the cause and what to do to err, an error of the API
// server about what (e.g. "get volumepair prod/db"), when it is one a user
// can fix; otherwise it only adds what.
func explainAPIError(what string, err error) error {
	switch {
	case meta.IsNoMatchError(err) || isResourceNotServed(err):
		return fmt.Errorf("%s: this cluster does not serve the VolumePair API (CRD volumepairs.storage.tandem.dev): Tandem is not installed here, or --context/--kubeconfig point at another cluster; see docs/install.md: %w", what, err)
	case isUnreachable(err):
		return fmt.Errorf("%s: cannot reach the API server: check --context, --kubeconfig or --server (kubectl cluster-info shows the one in use): %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// isResourceNotServed: a NotFound about the resource itself (the API server
// answers 404 without a Status of the object), as when the CRD is missing
// and the client does not map kinds.
func isResourceNotServed(err error) bool {
	var se apierrors.APIStatus
	if !errors.As(err, &se) || !apierrors.IsNotFound(err) {
		return false
	}
	d := se.Status().Details
	return d == nil || d.Name == ""
}

// isUnreachable: the API server could not be reached at all.
func isUnreachable(err error) bool {
	var op *net.OpError
	var dns *net.DNSError
	return errors.As(err, &op) || errors.As(err, &dns)
}

// pairNotFound explains why name is not in ns: the namespace does not
// exist, the pair is in another namespace, or it was deleted (its events
// remain), and lists what is there. err is the API server's NotFound.
func pairNotFound(ctx context.Context, c client.Client, ns, name string, err error) error {
	what := fmt.Sprintf("volumepair %q not found in namespace %s", name, ns)
	var ns0 corev1.Namespace
	if e := c.Get(ctx, client.ObjectKey{Name: ns}, &ns0); apierrors.IsNotFound(e) {
		return fmt.Errorf("%s: namespace %s does not exist (a typo in -n, or in the kubeconfig context's namespace?); kubectl tandem list -A lists the VolumePairs of every namespace: %w", what, ns, err)
	}
	var hints []string
	var all storagev1alpha1.VolumePairList
	if c.List(ctx, &all) == nil {
		var elsewhere []string
		for _, vp := range all.Items {
			if vp.Name == name && vp.Namespace != ns {
				elsewhere = append(elsewhere, vp.Namespace)
			}
		}
		sort.Strings(elsewhere)
		if len(elsewhere) > 0 {
			hints = append(hints, fmt.Sprintf("a VolumePair %s is in namespace %s: add -n %s", name, strings.Join(elsewhere, ", "), elsewhere[0]))
		}
	}
	if ev := lastEventsOf(ctx, c, ns, name, 3); len(ev) > 0 {
		hints = append(hints, "a VolumePair of that name was deleted; its last events: "+strings.Join(ev, "; "))
	}
	var here storagev1alpha1.VolumePairList
	if c.List(ctx, &here, client.InNamespace(ns)) == nil {
		switch n := len(here.Items); {
		case n == 0:
			hints = append(hints, "namespace "+ns+" has no VolumePairs, kubectl tandem list -A lists every namespace's")
		case n <= 10:
			var names []string
			for _, vp := range here.Items {
				names = append(names, vp.Name)
			}
			sort.Strings(names)
			hints = append(hints, "its VolumePairs are "+strings.Join(names, ", "))
		default:
			hints = append(hints, fmt.Sprintf("kubectl tandem list -n %s lists its %d VolumePairs", ns, n))
		}
	}
	if len(hints) == 0 {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %s: %w", what, strings.Join(hints, "; "), err)
}

// lastEventsOf returns the latest limit events about VolumePairs named name
// in ns, as "Type Reason: message", oldest first.
func lastEventsOf(ctx context.Context, c client.Client, ns, name string, limit int) []string {
	var list corev1.EventList
	if err := c.List(ctx, &list, client.InNamespace(ns), client.MatchingFields{
		"involvedObject.kind": "VolumePair",
		"involvedObject.name": name,
	}); err != nil {
		return nil
	}
	vp := &storagev1alpha1.VolumePair{}
	vp.Name = name
	var out []string
	for _, e := range selectEvents(list.Items, vp, limit) {
		out = append(out, fmt.Sprintf("%s %s: %s", e.Type, e.Reason, oneLine(e.Message)))
	}
	return out
}

// namespaceMissing says whether ns is known not to exist (false when it
// exists or cannot be read).
func namespaceMissing(ctx context.Context, c client.Client, ns string) bool {
	var n corev1.Namespace
	return apierrors.IsNotFound(c.Get(ctx, client.ObjectKey{Name: ns}, &n))
}
