package main

import (
	"os"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"
)

var agentLabels = map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "agent"}

// agentDS is an agent DaemonSet as the chart renders it: the token Secret's
// key mapped to the file "token" of a volume mounted at /etc/tandem/token.
func agentDS(ns, name, secret, key string) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: agentLabels},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: agentLabels},
			Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
				Containers: []corev1.Container{{
					Name: "agent", Image: "ghcr.io/tandem-storage/tandem:v0.3.0",
					Command:      []string{"/usr/local/bin/agent"},
					Args:         []string{"--node=$(NODE_NAME)", "--token-file=/etc/tandem/token/token"},
					VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/var/lib/tandem"}, {Name: "agent-token", MountPath: "/etc/tandem/token", ReadOnly: true}},
				}},
				Volumes: []corev1.Volume{
					{Name: "data", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/var/lib/tandem"}}},
					{Name: "agent-token", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
						SecretName: secret, Items: []corev1.KeyToPath{{Key: key, Path: "token"}},
					}}},
				},
			}},
		},
	}
}

func TestAgentTokenRef(t *testing.T) {
	for _, tt := range []struct {
		name    string
		mutate  func(ds *appsv1.DaemonSet)
		want    tokenRef
		wantErr string
	}{
		{name: "chart, existing secret with its own key", want: tokenRef{"storage", "my-token", "agent-token-v2"}},
		{name: "no items: the file name is the key", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Volumes[1].Secret.Items = nil
		}, want: tokenRef{"storage", "my-token", "token"}},
		{name: "flag and value as two arguments", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Containers[0].Args = []string{"--token-file", "/etc/tandem/token/token"}
		}, want: tokenRef{"storage", "my-token", "agent-token-v2"}},
		{name: "agent is not the first container", mutate: func(ds *appsv1.DaemonSet) {
			spec := &ds.Spec.Template.Spec
			spec.Containers = append([]corev1.Container{{Name: "sidecar", Args: []string{"--token-file=/nowhere/token"}}}, spec.Containers...)
		}, want: tokenRef{"storage", "my-token", "agent-token-v2"}},
		{name: "the file mounted with a subPath", mutate: func(ds *appsv1.DaemonSet) {
			ctr := &ds.Spec.Template.Spec.Containers[0]
			ctr.Args = []string{"--token-file=/etc/tandem/tok"}
			ctr.VolumeMounts[1] = corev1.VolumeMount{Name: "agent-token", MountPath: "/etc/tandem/tok", SubPath: "token"}
		}, want: tokenRef{"storage", "my-token", "agent-token-v2"}},
		{name: "no --token-file", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Containers[0].Args = []string{"--node=x"}
		}, wantErr: "DaemonSet storage/tandem-agent: container agent has no --token-file argument"},
		{name: "token file not on a Secret", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Containers[0].Args = []string{"--token-file=/var/lib/tandem/token"}
		}, wantErr: "on volume data, which is not a Secret"},
		{name: "token file on no volume", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Containers[0].Args = []string{"--token-file=/run/token"}
		}, wantErr: "no volume of container agent is mounted where its --token-file /run/token is"},
		{name: "items map no key to the file", mutate: func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Volumes[1].Secret.Items[0].Path = "other"
		}, wantErr: "volume agent-token (secret my-token) maps no key to token"},
	} {
		ds := agentDS("storage", "tandem-agent", "my-token", "agent-token-v2")
		if tt.mutate != nil {
			tt.mutate(ds)
		}
		got, err := agentTokenRef(ds)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: agentTokenRef = %v, %v; want error containing %q", tt.name, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: agentTokenRef = %v, %v; want %v", tt.name, got, err, tt.want)
		}
	}
}

// TestVerifyFindsTheInstall: verify finds the install's namespace and token
// Secret from the agents' DaemonSet, and says what it looked for when it
// finds none or several. The fake cluster has no agent Leases, so a run that
// found the install stops at the first Lease, naming its namespace.
func TestVerifyFindsTheInstall(t *testing.T) {
	pair := testPair()
	pair.Namespace = "prod"
	token := func(ns, name, key, value string) *corev1.Secret {
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: map[string][]byte{key: []byte(value)}}
	}
	other := agentDS("other", "tandem-agent", "tandem-agent-token", "token")
	unlabelled := agentDS("kube-system", "not-tandem", "x", "token")
	unlabelled.Labels = map[string]string{"app.kubernetes.io/component": "agent"}
	for _, tt := range []struct {
		name    string
		objs    []client.Object
		args    []string
		wantErr string
	}{
		{"found by its labels, chart-named secret and key",
			[]client.Object{pair, unlabelled, agentDS("storage", "rel-tandem-agent", "rel-tandem-agent-token", "tok"), token("storage", "rel-tandem-agent-token", "tok", "s3cret")}, nil,
			"no Lease storage/tandem-agent-node-a"},
		{"none",
			[]client.Object{pair, unlabelled}, nil,
			"found no Tandem agents: no DaemonSet with labels app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent in any namespace"},
		{"none in the namespace given",
			[]client.Object{pair, other}, []string{"--operator-namespace", "storage"},
			"no DaemonSet with labels app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent in namespace storage"},
		{"several",
			[]client.Object{pair, other, agentDS("storage", "tandem-agent", "t", "token")}, nil,
			"found 2 Tandem installs: DaemonSets other/tandem-agent, storage/tandem-agent all have labels"},
		{"several, one picked",
			[]client.Object{pair, other, agentDS("storage", "tandem-agent", "t", "token"), token("storage", "t", "token", "x")}, []string{"--operator-namespace", "storage"},
			"no Lease storage/tandem-agent-node-a"},
		{"another selector",
			[]client.Object{pair, unlabelled, token("kube-system", "x", "token", "x")}, []string{"--agent-selector", "app.kubernetes.io/component=agent"},
			"no Lease kube-system/tandem-agent-node-a"},
		{"the secret is missing",
			[]client.Object{pair, other}, nil,
			"read the agents' token from secret other/tandem-agent-token (key token), which DaemonSet other/tandem-agent mounts (or pass --token-file)"},
		{"the key is empty",
			[]client.Object{pair, other, token("other", "tandem-agent-token", "token", " \n")}, nil,
			"the agents' token: secret other/tandem-agent-token (key token) is missing or empty"},
	} {
		objs := append(tt.objs, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}})
		res := runPluginFake(t, objs, append([]string{"verify", pair.Name}, tt.args...)...)
		if res.err == nil || !strings.Contains(res.err.Error(), tt.wantErr) {
			t.Errorf("%s: verify: %v; want an error containing %q", tt.name, res.err, tt.wantErr)
		}
	}
}

// The DaemonSet config/agent installs is found by the default selector, and
// its token is the Secret the install docs create.
func TestAgentTokenRefOfConfig(t *testing.T) {
	b, err := os.ReadFile("../../config/agent/agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatalf("config/agent/agent.yaml: %v", err)
	}
	sel, err := labels.Parse(defaultAgentSelector)
	if err != nil {
		t.Fatal(err)
	}
	if !sel.Matches(labels.Set(ds.Labels)) {
		t.Errorf("config/agent/agent.yaml: labels %v do not match the plugin's selector %s", ds.Labels, defaultAgentSelector)
	}
	got, err := agentTokenRef(&ds)
	if want := (tokenRef{"tandem-system", "tandem-agent-token", "token"}); err != nil || got != want {
		t.Errorf("agentTokenRef(config/agent/agent.yaml) = %v, %v; want %v", got, err, want)
	}
}
