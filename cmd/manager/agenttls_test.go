package main

import (
	"context"
	"crypto/tls"
	"net/http"
	"strings"
	"testing"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestAgentDialTLS: the manager takes an agent's certificate only when it
// names the node whose Lease advertises the address dialed.
func TestAgentDialTLS(t *testing.T) {
	ca := tlsidtest.NewCA(t, "tandem-ca")
	manager := tlsidtest.Load(t, ca.Dir(t, tlsid.Manager))
	// serve answers /v1/info over HTTPS with a certificate naming id.
	serve := func(id tlsid.Identity) string {
		src := tlsidtest.Load(t, ca.Dir(t, id))
		ln := tls.NewListener(testkit.Listen(t), src.ServerConfig(false))
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte(`{"node":"x"}`))
		})}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })
		return ln.Addr().String()
	}
	lease := func(node, addr string) client.Object {
		return &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: v1.AgentLeaseName(node), Labels: map[string]string{v1.LabelComponent: "agent"},
				Annotations: map[string]string{v1.AnnControlEndpoint: "https://" + addr}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node)},
		}
	}
	nodeA, nodeBAsA, managerAsA, unknown := serve(tlsid.NodeIdentity("node-a")), serve(tlsid.NodeIdentity("node-b")), serve(tlsid.Manager), serve(tlsid.NodeIdentity("node-c"))
	// The Lease of node-x names nodeBAsA's address too: a stale Lease.
	leases := fake.NewClientBuilder().WithObjects(lease("node-a", nodeA), lease("node-a2", nodeBAsA), lease("node-a3", managerAsA),
		lease("node-x", nodeA)).Build()
	newAPI := agentapi.NewTLSAPIFor(agentDialTLS(manager, leases, "tandem-system"))
	for _, tc := range []struct {
		name, addr, want string
	}{
		{name: "the Lease's node", addr: nodeA},
		{name: "another node's certificate at the address", addr: nodeBAsA, want: "presented the identity of node node-b, but that address is the agent of node-a2"},
		{name: "a certificate naming no node", addr: managerAsA, want: "presented spiffe://tandem.dev/manager, not a node's identity"},
		{name: "an address no Lease names", addr: unknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newAPI("https://"+tc.addr, "token").(*agentapi.Client).Info(context.Background())
			if tc.want == "" && err != nil {
				t.Fatalf("Info: %v", err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("Info: %v, want an error with %q", err, tc.want)
			}
		})
	}
}
