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

// TestArgumentErrors: arguments a subcommand does not take are refused with
// what to type instead, and the completion command refuses a missing or
// unknown shell rather than printing its help with exit status 0.
func TestArgumentErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "db"}, `list takes no arguments (got "db"): to show one VolumePair, kubectl tandem status db; to list some, -l KEY=VALUE`},
		{[]string{"completion"}, "kubectl tandem completion needs the shell, one of bash, zsh, fish, powershell; e.g. source <(kubectl-tandem completion bash)"},
		{[]string{"completion", "bsh"}, `unknown shell "bsh": kubectl tandem completion writes the script for bash, zsh, fish, powershell`},
	} {
		res := runPluginFake(t, nil, tt.args...)
		if res.err == nil || !strings.Contains(res.err.Error(), tt.want) {
			t.Errorf("%v: %v; want an error containing %q", tt.args, res.err, tt.want)
		}
		if res.connected {
			t.Errorf("%v: contacted the API server", tt.args)
		}
	}
	res := runPluginFake(t, nil, "completion", "bash")
	if res.err != nil || !strings.Contains(res.stdout, "bash completion V2 for kubectl-tandem") {
		t.Errorf("completion bash: %v\n%.200s", res.err, res.stdout)
	}
}
