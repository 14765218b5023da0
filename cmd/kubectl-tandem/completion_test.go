package main

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

func TestCompletion(t *testing.T) {
	pairIn := func(ns, name string) client.Object {
		vp := testPair()
		vp.Namespace, vp.Name = ns, name
		return vp
	}
	nsObj := func(name string) client.Object { return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}} }
	objs := []client.Object{pairIn("prod", "db"), pairIn("prod", "db-logs"), pairIn("prod", "web"), pairIn("staging", "db-staging"),
		nsObj("prod"), nsObj("staging"), nsObj("kube-system")}
	for _, tt := range []struct {
		name string
		args []string // after __complete --kubeconfig K
		want []string
	}{
		{"status: the namespace's pairs", []string{"-n", "prod", "status", ""}, []string{"db", "db-logs", "web"}},
		{"prefix", []string{"-n", "prod", "status", "db"}, []string{"db", "db-logs"}},
		{"another namespace", []string{"--namespace", "staging", "failover", ""}, []string{"db-staging"}},
		{"failback", []string{"-n", "prod", "failback", "w"}, []string{"web"}},
		{"verify", []string{"-n", "prod", "verify", ""}, []string{"db", "db-logs", "web"}},
		{"one name only", []string{"-n", "prod", "status", "db", ""}, nil},
		{"-n", []string{"status", "-n", ""}, []string{"kube-system", "prod", "staging"}},
		{"-n prefix", []string{"-n", "st"}, []string{"staging"}},
		{"--operator-namespace", []string{"verify", "--operator-namespace", "k"}, []string{"kube-system"}},
		{"subcommands", []string{"ver"}, []string{"verify", "version"}},
	} {
		res := runPluginArgs(t, objs, func(kubeconfig string) []string {
			return append([]string{"__complete", "--kubeconfig", kubeconfig}, tt.args...)
		})
		if res.err != nil {
			t.Errorf("%s: __complete: %v", tt.name, res.err)
			continue
		}
		if got := completions(res.stdout); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: completions %q, want %q", tt.name, got, tt.want)
		}
		// Never file names.
		if !strings.Contains(res.stdout, ":4\n") {
			t.Errorf("%s: directive is not NoFileComp:\n%s", tt.name, res.stdout)
		}
	}
}

// completions are the candidates of __complete's output (one a line, before
// the ":directive" line), without their descriptions.
func completions(out string) []string {
	var got []string
	for _, line := range strings.Split(out, "\n") {
		if line == "" || strings.HasPrefix(line, ":") {
			break
		}
		name, _, _ := strings.Cut(line, "\t")
		got = append(got, name)
	}
	return got
}
