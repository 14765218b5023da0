package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// TestChartTest: the helm test check passes when a manager and an agent
// answer /healthz, and fails when one does not, when none runs, or when
// the VolumePair API is not served.
func TestChartTest(t *testing.T) {
	serve := func(status int) (*httptest.Server, int) {
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/healthz" {
				http.NotFound(w, r)
				return
			}
			w.WriteHeader(status)
		}))
		t.Cleanup(s.Close)
		_, p, _ := net.SplitHostPort(s.Listener.Addr().String())
		port, _ := strconv.Atoi(p)
		return s, port
	}
	pod := func(name, component string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "tandem-system", Labels: map[string]string{
				"app.kubernetes.io/instance": "tandem", "app.kubernetes.io/component": component}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "127.0.0.1"},
		}
	}
	_, okPort := serve(http.StatusOK)
	_, badPort := serve(http.StatusServiceUnavailable)
	closed := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		return p
	}()
	for _, c := range []struct {
		name         string
		pods         []client.Object
		mPort, aPort int
		noCRD        bool
		want         string // "" = pass
	}{
		{"healthy", []client.Object{pod("m", "manager"), pod("a", "agent")}, okPort, okPort, false, ""},
		{"agent unhealthy", []client.Object{pod("m", "manager"), pod("a", "agent")}, okPort, badPort, false, "agent a"},
		{"manager down", []client.Object{pod("m", "manager"), pod("a", "agent")}, closed, okPort, false, "manager m"},
		{"no agent", []client.Object{pod("m", "manager")}, okPort, okPort, false, "no agent Pod"},
		{"no CRD", []client.Object{pod("m", "manager"), pod("a", "agent")}, okPort, okPort, true, "VolumePair API"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fake.NewClientBuilder().WithScheme(newScheme()).WithObjects(c.pods...)
			var cl client.Client = b.Build()
			if c.noCRD {
				cl = noVolumePairs{cl}
			}
			var out bytes.Buffer
			err := chartTest(context.Background(), cl, chartTestOptions{namespace: "tandem-system", instance: "tandem", managerPort: c.mPort, agentPort: c.aPort}, http.DefaultClient, &out)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("chartTest = %v, want it to pass", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("chartTest = %v, want an error naming %q", err, c.want)
			}
		})
	}
}

// noVolumePairs answers a VolumePair list as an API server without the CRD
// does.
type noVolumePairs struct{ client.Client }

func (c noVolumePairs) List(ctx context.Context, l client.ObjectList, opts ...client.ListOption) error {
	if _, ok := l.(*storagev1alpha1.VolumePairList); ok {
		return &meta.NoKindMatchError{GroupKind: schema.GroupKind{Group: "storage.tandem.dev", Kind: "VolumePair"}}
	}
	return c.Client.List(ctx, l, opts...)
}
