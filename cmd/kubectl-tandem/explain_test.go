package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestPairNotFound: every subcommand that takes a pair's name says why it
// is not there and what to do: the namespace does not exist, the pair is in
// another namespace, a pair of that name was deleted (its events say what
// became of it), and which pairs the namespace holds.
func TestPairNotFound(t *testing.T) {
	inStaging := testPair()
	inStaging.Namespace, inStaging.Name = "staging", "cache"
	web := testPair()
	web.Name = "web"
	gone := corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: "old.1", Namespace: "prod"},
		InvolvedObject: corev1.ObjectReference{Kind: "VolumePair", Name: "old", Namespace: "prod", UID: "uid-9", APIVersion: storagev1alpha1.GroupVersion.String()},
		Type:           corev1.EventTypeWarning, Reason: "TeardownIncomplete",
		Message:        "Replica on node-b not removed: agent unreachable. Its files stay in /var/lib/tandem/volumes/prod/old on node node-b",
		FirstTimestamp: at(time.Minute), LastTimestamp: at(time.Minute), Count: 1,
	}
	objs := []client.Object{testPair(), web, inStaging, &gone}
	for _, tt := range []struct {
		name string
		args []string
		want []string
	}{
		{"a typo in the name", []string{"status", "dbb"}, []string{
			`volumepair "dbb" not found in namespace prod: its VolumePairs are db, web: `,
			`volumepairs.storage.tandem.dev "dbb" not found`}},
		{"a namespace that does not exist", []string{"-n", "prdo", "status", "db"}, []string{
			`volumepair "db" not found in namespace prdo: namespace prdo does not exist (a typo in -n, or in the kubeconfig context's namespace?); kubectl tandem list -A lists the VolumePairs of every namespace`}},
		{"in another namespace", []string{"failover", "cache"}, []string{
			`volumepair "cache" not found in namespace prod: a VolumePair cache is in namespace staging: add -n staging; its VolumePairs are db, web`}},
		{"deleted", []string{"failback", "old"}, []string{
			`volumepair "old" not found in namespace prod: a VolumePair of that name was deleted; its last events: Warning TeardownIncomplete: Replica on node-b not removed: agent unreachable. Its files stay in /var/lib/tandem/volumes/prod/old on node node-b`}},
		{"verify", []string{"verify", "dbb"}, []string{`volumepair "dbb" not found in namespace prod: its VolumePairs are db, web`}},
		{"an empty namespace", []string{"-n", "staging", "status", "db"}, []string{
			`volumepair "db" not found in namespace staging: a VolumePair db is in namespace prod: add -n prod; its VolumePairs are cache`}},
	} {
		res := runPluginFake(t, objs, tt.args...)
		if res.err == nil {
			t.Errorf("%s: %v succeeded", tt.name, tt.args)
			continue
		}
		if !apierrors.IsNotFound(res.err) {
			t.Errorf("%s: %v does not wrap the API server's NotFound", tt.name, res.err)
		}
		for _, w := range tt.want {
			if !strings.Contains(res.err.Error(), w) {
				t.Errorf("%s: %v: error lacks %q:\n%v", tt.name, tt.args, w, res.err)
			}
		}
	}
}

// TestNoVolumePairAPI: a cluster without the CRD (Tandem not installed, or
// the wrong context) is named as such, not as a missing pair.
func TestNoVolumePairAPI(t *testing.T) {
	noKind := func(gvk schema.GroupVersionKind) error {
		return &meta.NoKindMatchError{GroupKind: gvk.GroupKind(), SearchedVersions: []string{gvk.Version}}
	}
	funcs := interceptor.Funcs{
		Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if _, ok := obj.(*storagev1alpha1.VolumePair); ok {
				return noKind(volumePairGVK)
			}
			return c.Get(ctx, key, obj, opts...)
		},
		List: func(ctx context.Context, c client.WithWatch, list client.ObjectList, opts ...client.ListOption) error {
			if _, ok := list.(*storagev1alpha1.VolumePairList); ok {
				return noKind(storagev1alpha1.GroupVersion.WithKind("VolumePairList"))
			}
			return c.List(ctx, list, opts...)
		},
	}
	for _, args := range [][]string{{"status", "db"}, {"failover", "db"}, {"verify", "db"}, {"list"}} {
		res := runPluginWith(t, nil, funcs, func(kubeconfig string) []string {
			return append([]string{"--kubeconfig", kubeconfig, "-n", "prod"}, args...)
		})
		const want = "this cluster does not serve the VolumePair API (CRD volumepairs.storage.tandem.dev): Tandem is not installed here, or --context/--kubeconfig point at another cluster; see docs/install.md"
		if res.err == nil || !strings.Contains(res.err.Error(), want) {
			t.Errorf("%v: %v; want an error containing %q", args, res.err, want)
		}
	}
}

// TestNoCluster: a kubeconfig that is not there, or an API server that does
// not answer, is named with the flags that choose them.
func TestNoCluster(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(empty, []byte("apiVersion: v1\nkind: Config\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--kubeconfig", "/nonexistent/kubeconfig", "status", "db"},
			"error: read the kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) for the namespace: stat /nonexistent/kubeconfig: no such file or directory"},
		{[]string{"--kubeconfig", empty, "--server", "https://" + closed, "status", "db"},
			"error: get volumepair default/db: cannot reach the API server: check --context, --kubeconfig or --server (kubectl cluster-info shows the one in use): "},
		{[]string{"--kubeconfig", empty, "--server", "https://" + closed, "list"},
			"error: list volumepairs in namespace default: cannot reach the API server: check --context, --kubeconfig or --server"},
	} {
		var out, errb bytes.Buffer
		code := run(t.Context(), tt.args, genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errb})
		if code != 1 || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and %q", tt.args, code, errb.String(), tt.want)
		}
	}
}

// agentLease is node's agent Lease in storage, its control API at url,
// renewed renewed ago (never when zero).
func agentLease(node, url string, renewed time.Duration) *coordinationv1.Lease {
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: storagev1alpha1.AgentLeaseName(node),
		Annotations: map[string]string{storagev1alpha1.AnnControlEndpoint: url}}}
	if renewed > 0 {
		l.Spec.RenewTime = ptr.To(metav1.NewMicroTime(time.Now().Add(-renewed)))
		l.Spec.LeaseDurationSeconds = ptr.To(int32(15))
	}
	return l
}

// TestVerifyAgentsUnavailable: verify names each reason it cannot reach a
// member's agent (a node that does not exist, an agent that never
// registered or stopped, an address that does not answer, a wrong token, no
// right to read the token or the install) and what to do, with exit 2.
func TestVerifyAgentsUnavailable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	wrongToken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"error":"unauthorized"}`))
	}))
	defer wrongToken.Close()
	// An agent whose replica has not grown yet to spec.size (1Gi).
	small := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(agentapi.Status{Name: "prod/db", Size: 512 << 20, RegionSize: testPair().Spec.RegionSizeBytes(), Role: agentapi.RoleBackup})
	}))
	defer small.Close()
	node := func(name string) client.Object { return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}} }
	install := []client.Object{agentDS("storage", "tandem-agent", "tandem-agent-token", "token"),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: "tandem-agent-token"}, Data: map[string][]byte{"token": []byte("s3cret")}}}
	typo := testPair()
	typo.Spec.Backup.Node = "node-bb"
	forbid := func(gr schema.GroupResource, name string) error {
		return apierrors.NewForbidden(gr, name, errors.New(`User "alice" cannot get it`))
	}
	for _, tt := range []struct {
		name  string
		objs  []client.Object
		funcs interceptor.Funcs
		want  []string
	}{
		{"a typo in a member's node, the other's agent stopped", append([]client.Object{typo, node("node-a"), node("node-b"), agentLease("node-a", wrongToken.URL, time.Hour)}, install...), interceptor.Funcs{}, []string{
			"the agent of node node-a is not running, or cannot reach the API server: it last renewed its Lease storage/tandem-agent-node-a 1h ago",
			"node node-bb (spec.backup.node of volumepair prod/db) does not exist in the cluster (kubectl get nodes lists them): a typo in the VolumePair, or a node that was removed"}},
		{"no agent registered", append([]client.Object{testPair(), node("node-a"), node("node-b")}, install...), interceptor.Funcs{}, []string{
			"no Tandem agent has registered on node node-a (spec.primary.node of volumepair prod/db): there is no Lease storage/tandem-agent-node-a; is the agent running there (kubectl -n storage get pods -l app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent -o wide --field-selector spec.nodeName=node-a)?"}},
		{"an agent that stopped", append([]client.Object{testPair(), node("node-a"), node("node-b"), agentLease("node-a", closed, 5*time.Minute)}, install...), interceptor.Funcs{}, []string{
			"the agent of node node-a is not running, or cannot reach the API server: it last renewed its Lease storage/tandem-agent-node-a 5m ago",
			"Check it: kubectl -n storage get pods -l app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent -o wide --field-selector spec.nodeName=node-a"}},
		{"an agent that does not answer", append([]client.Object{testPair(), node("node-a"), node("node-b"), agentLease("node-a", closed, time.Second), agentLease("node-b", closed, time.Second)}, install...), interceptor.Funcs{}, []string{
			"cannot reach the agent of node node-a at " + closed + " (from its Lease storage/tandem-agent-node-a): the plugin calls each member's agent directly, on its node's IP; run it where the nodes' addresses are reachable",
			"connection refused"}},
		{"a member still growing", append([]client.Object{testPair(), node("node-a"), node("node-b"), agentLease("node-a", small.URL, time.Second), agentLease("node-b", small.URL, time.Second)}, install...), interceptor.Funcs{}, []string{
			"the replica of prod/db on node node-a serves 512 MiB, spec.size asks for 1 GiB: the pair is growing (kubectl tandem status db shows the Expanding condition); verify once every member serves spec.size"}},
		{"a wrong token", append([]client.Object{testPair(), node("node-a"), node("node-b"), agentLease("node-a", wrongToken.URL, time.Second), agentLease("node-b", wrongToken.URL, time.Second)}, install...), interceptor.Funcs{}, []string{
			"the agent of node node-a (" + wrongToken.URL + ") refused the token (HTTP 401): the token given (--token-file, or the Secret the agents' DaemonSet mounts) is not the one the agents were started with"}},
		{"no right to read the token", append([]client.Object{testPair()}, install...), interceptor.Funcs{Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if _, ok := obj.(*corev1.Secret); ok {
				return forbid(schema.GroupResource{Resource: "secrets"}, key.Name)
			}
			return c.Get(ctx, key, obj, opts...)
		}}, []string{
			"read the agents' token from secret storage/tandem-agent-token (key token), which DaemonSet storage/tandem-agent mounts: you may not read that Secret; pass the token in a file with --token-file (ask whoever administers Tandem), or get permission to get secrets/tandem-agent-token in namespace storage"}},
		{"no right to find the install", []client.Object{testPair()}, interceptor.Funcs{List: func(ctx context.Context, c client.WithWatch, list client.ObjectList, opts ...client.ListOption) error {
			if _, ok := list.(*storagev1alpha1.VolumePairList); !ok {
				return forbid(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, "")
			}
			return c.List(ctx, list, opts...)
		}}, []string{
			"you may not list DaemonSets there; pass --operator-namespace NS (where Tandem is installed) and --token-file FILE (the agents' token), which need no DaemonSet"}},
		{"no right to read the agents' Leases", append([]client.Object{testPair(), node("node-a")}, install...), interceptor.Funcs{Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if _, ok := obj.(*coordinationv1.Lease); ok {
				return forbid(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, key.Name)
			}
			return c.Get(ctx, key, obj, opts...)
		}}, []string{
			"find the agent of node node-a: you may not read the agents' Leases in namespace storage (verify needs get on leases.coordination.k8s.io there)"}},
	} {
		start := time.Now()
		res := runPluginWith(t, tt.objs, tt.funcs, func(kubeconfig string) []string {
			return []string{"--kubeconfig", kubeconfig, "-n", "prod", "verify", "db"}
		})
		var ee *exitError
		if !errors.As(res.err, &ee) || ee.code != 2 {
			t.Errorf("%s: %v; want exit status 2", tt.name, res.err)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(res.err.Error(), w) {
				t.Errorf("%s: error lacks %q:\n%v", tt.name, w, res.err)
			}
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("%s: took %s", tt.name, d)
		}
	}
}
