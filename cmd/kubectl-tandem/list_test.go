package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func TestListCommand(t *testing.T) {
	mk := func(ns, name string, phase storagev1alpha1.Phase, labels map[string]string) client.Object {
		vp := testPair()
		vp.Namespace, vp.Name, vp.Labels = ns, name, labels
		vp.CreationTimestamp = metav1.NewTime(time.Now().Add(-3 * time.Hour))
		vp.Status = storagev1alpha1.VolumePairStatus{Phase: phase, ActivePrimary: "node-a", Epoch: 7, OutOfSyncBytes: 2 << 20,
			MembersInSync: "1/2", Endpoint: "198.18.0.2:10809", UnmergedRegions: 3,
			Conditions: []metav1.Condition{{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", LastTransitionTime: metav1.Now()}}}
		if phase == storagev1alpha1.PhaseCopy {
			vp.Status.Conditions = nil
		}
		vp.ManagedFields = []metav1.ManagedFieldsEntry{{
			Manager: "tandem-controller", Operation: metav1.ManagedFieldsOperationUpdate,
			APIVersion: storagev1alpha1.GroupVersion.String(), FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(`{"f:status":{}}`),
		}}
		return vp
	}
	objs := []client.Object{
		mk("prod", "db", storagev1alpha1.PhasePair, map[string]string{"app": "db"}),
		mk("prod", "web", storagev1alpha1.PhaseCopy, nil),
		mk("staging", "cache", storagev1alpha1.PhaseSwap, nil),
	}
	for _, tt := range []struct {
		name     string
		args     []string
		want     []string
		notWant  []string
		wantErr  string
		wantOut  string // exact stdout
		wantJSON []string
	}{
		{name: "table", args: nil, want: []string{
			"NAME   MODE    PRIMARY   ACTIVE   BACKUP   PHASE   STATUS    IN-SYNC   OUT-OF-SYNC   AGE",
			"db     Async   node-a    node-a   node-b   PAIR    Serving   1/2       2 MiB         3h",
			"web    Async   node-a    node-a   node-b   COPY    -         1/2       2 MiB         3h"}, notWant: []string{"cache", "NAMESPACE", "EPOCH"}},
		{name: "wide", args: []string{"-o", "wide"}, want: []string{
			"UNMERGED   EPOCH   ENDPOINT",
			"3          7       198.18.0.2:10809   3h"}},
		{name: "all namespaces", args: []string{"-A"}, want: []string{"NAMESPACE   NAME", "staging     cache", "prod        db"}},
		{name: "selector", args: []string{"-l", "app=db"}, want: []string{"db "}, notWant: []string{"web"}},
		{name: "name", args: []string{"-o", "name"}, wantOut: "volumepair.storage.tandem.dev/db\nvolumepair.storage.tandem.dev/web\n"},
		{name: "jsonpath", args: []string{"-A", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.outOfSyncBytes} {end}"}, wantOut: "db=2097152 web=2097152 cache=2097152 "},
		{name: "go-template", args: []string{"-o", "go-template={{range .items}}{{.kind}}/{{.metadata.name}};{{end}}"}, wantOut: "VolumePair/db;VolumePair/web;"},
		{name: "json", args: []string{"-o", "json"}, wantJSON: []string{"db", "web"}},
		{name: "yaml", args: []string{"-o", "yaml"}, wantJSON: []string{"db", "web"}},
		{name: "unknown format", args: []string{"-o", "table"}, wantErr: "unknown output format \"table\": want one of json, yaml, kyaml, name, go-template, go-template-file, template, templatefile, jsonpath, jsonpath-as-json, jsonpath-file, wide"},
		{name: "nothing found", args: []string{"-n", "empty"}, wantOut: ""},
	} {
		res := runPluginFake(t, objs, append([]string{"list"}, tt.args...)...)
		if tt.wantErr != "" {
			if res.err == nil || !strings.Contains(res.err.Error(), tt.wantErr) {
				t.Errorf("%s: list: %v; want error containing %q", tt.name, res.err, tt.wantErr)
			}
			if res.connected {
				t.Errorf("%s: a bad -o connected to the cluster first", tt.name)
			}
			continue
		}
		if res.err != nil {
			t.Errorf("%s: list: %v", tt.name, res.err)
			continue
		}
		checkContains(t, tt.name, res.stdout, tt.want, tt.notWant)
		if tt.want == nil && tt.wantJSON == nil && res.stdout != tt.wantOut {
			t.Errorf("%s: output %q, want %q", tt.name, res.stdout, tt.wantOut)
		}
		if tt.wantJSON != nil {
			b := []byte(res.stdout)
			if tt.args[1] == "yaml" {
				var err error
				if b, err = yaml.YAMLToJSON(b); err != nil {
					t.Fatalf("%s: %v", tt.name, err)
				}
			}
			var l storagev1alpha1.VolumePairList
			if err := json.Unmarshal(b, &l); err != nil {
				t.Fatalf("%s: %v\n%s", tt.name, err, res.stdout)
			}
			var names []string
			for _, it := range l.Items {
				names = append(names, it.Name)
				if it.Kind != "VolumePair" || it.APIVersion != storagev1alpha1.GroupVersion.String() {
					t.Errorf("%s: item %s has apiVersion %q kind %q", tt.name, it.Name, it.APIVersion, it.Kind)
				}
				if len(it.ManagedFields) != 0 {
					t.Errorf("%s: item %s keeps its managed fields", tt.name, it.Name)
				}
			}
			if strings.Join(names, ",") != strings.Join(tt.wantJSON, ",") {
				t.Errorf("%s: items %v, want %v", tt.name, names, tt.wantJSON)
			}
		}
	}
	empty := append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "empty"}})
	if res := runPluginFake(t, empty, "list", "-n", "empty"); res.err != nil || res.stderr != "No VolumePairs found in namespace empty.\n" {
		t.Errorf("list of an empty namespace: %v, stderr %q", res.err, res.stderr)
	}
	// A namespace that does not exist (a typo in -n) is named as such, as
	// kubectl get says nothing is found there.
	if res := runPluginFake(t, objs, "list", "-n", "prdo"); res.err != nil ||
		res.stderr != "No VolumePairs found in namespace prdo: namespace prdo does not exist (kubectl tandem list -A lists the VolumePairs of every namespace).\n" {
		t.Errorf("list of a namespace that does not exist: %v, stderr %q", res.err, res.stderr)
	}
}
