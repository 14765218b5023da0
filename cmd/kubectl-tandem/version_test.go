package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/internal/version"
)

func managerDeploy(ns, image string) *appsv1.Deployment {
	l := map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "manager"}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "tandem-manager", Labels: map[string]string{
			"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "manager", "app.kubernetes.io/version": "0.3.0"}},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: l},
			Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "manager", Image: image}}}},
		},
	}
}

// pod is a pod of a workload running image in its container ctr.
func pod(ns, name string, labels map[string]string, ctr, image string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "sidecar", Image: "sidecar:1"}, {Name: ctr, Image: "spec-image"}}},
		Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{
			{Name: "sidecar", Image: "sidecar:1"}, {Name: ctr, Image: image},
		}},
	}
}

func TestVersionCommand(t *testing.T) {
	old := version.Version
	version.Version = "v9.8.7"
	defer func() { version.Version = old }()
	mgrLabels := map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "manager"}
	install := []client.Object{
		managerDeploy("storage", "tandem:v2"),
		pod("storage", "m-1", mgrLabels, "manager", "tandem:v2"),
		pod("storage", "m-2", mgrLabels, "manager", "tandem:v1"),
		agentDS("storage", "tandem-agent", "t", "token"),
		pod("storage", "a-1", agentLabels, "agent", "tandem:v2"),
		pod("storage", "a-2", agentLabels, "agent", "tandem:v2"),
		pod("elsewhere", "a-3", agentLabels, "agent", "tandem:old"), // another namespace: not the DaemonSet's
	}
	for _, tt := range []struct {
		name          string
		objs          []client.Object
		args          []string
		wantConnected bool
		want          []string
		notWant       []string
	}{
		{"client only", install, []string{"--client"}, false, []string{"Plugin: v9.8.7 ("}, []string{"Cluster", "manager"}},
		{"install", install, nil, true, []string{
			"Plugin: v9.8.7 (",
			"manager    storage/tandem-manager  0.3.0    tandem:v2",
			"tandem:v1 (1), tandem:v2 (1)",
			"agents     storage/tandem-agent    -        ghcr.io/tandem-storage/tandem:v0.3.0  tandem:v2 (2)",
		}, []string{"tandem:old"}},
		{"no install", nil, nil, true, []string{"Cluster: no Tandem install found (no Deployment with labels app.kubernetes.io/name=tandem,app.kubernetes.io/component=manager"}, nil},
		{"jsonpath", install, []string{"-o", "jsonpath={.plugin.version} {.agents[0].running[0].image}"}, true, []string{"v9.8.7 tandem:v2"}, nil},
	} {
		res := runPluginFake(t, tt.objs, append([]string{"version"}, tt.args...)...)
		if res.err != nil {
			t.Errorf("%s: version: %v", tt.name, res.err)
			continue
		}
		if res.connected != tt.wantConnected {
			t.Errorf("%s: connected = %v, want %v", tt.name, res.connected, tt.wantConnected)
		}
		checkContains(t, tt.name, res.stdout, tt.want, tt.notWant)
	}

	// -o json: the report's structure.
	res := runPluginFake(t, install, "version", "-o", "json")
	if res.err != nil {
		t.Fatalf("version -o json: %v", res.err)
	}
	var rep versionReport
	if err := json.Unmarshal([]byte(res.stdout), &rep); err != nil {
		t.Fatalf("version -o json: %v\n%s", err, res.stdout)
	}
	wantAgents := []workloadVersion{{Kind: "DaemonSet", Namespace: "storage", Name: "tandem-agent", Image: "ghcr.io/tandem-storage/tandem:v0.3.0", Running: []imagePods{{"tandem:v2", 2}}}}
	if rep.Plugin.Version != "v9.8.7" || !reflect.DeepEqual(rep.Agents, wantAgents) || len(rep.Managers) != 1 || rep.Managers[0].Version != "0.3.0" {
		t.Errorf("version -o json = %+v, want plugin v9.8.7, agents %+v, one manager of version 0.3.0", rep, wantAgents)
	}
}

// An unreachable cluster is reported, not an error.
func TestVersionUnreachable(t *testing.T) {
	var out bytes.Buffer
	o := &rootOptions{
		flags:     genericclioptions.NewConfigFlags(true),
		streams:   genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &out},
		newClient: func() (client.Client, error) { return nil, errors.New("connect to the API server: refused") },
	}
	root := o.rootCmd()
	root.SetArgs([]string{"version"})
	if err := root.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("version: %v", err)
	}
	if want := "Cluster: not reachable: connect to the API server: refused"; !strings.Contains(out.String(), want) {
		t.Errorf("version output lacks %q:\n%s", want, out.String())
	}
}

// checkContains reports, for a test case called name, each of want that
// out lacks and each of notWant it has.
func checkContains(t *testing.T, name, out string, want, notWant []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("%s: output lacks %q:\n%s", name, w, out)
		}
	}
	for _, w := range notWant {
		if strings.Contains(out, w) {
			t.Errorf("%s: output has %q:\n%s", name, w, out)
		}
	}
}
