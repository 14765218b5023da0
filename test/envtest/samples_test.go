package envtest

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// TestSamplesApplyWithDashF: config/samples is applied with kubectl apply
// -f (README, config/samples/README.md), which reads every .json, .yaml and
// .yml file of the directory as Kubernetes objects. Every such file must
// therefore be a VolumePair the API server accepts. A kustomization.yaml
// there made `kubectl apply -f config/samples/` create the pairs and then
// fail with "apiVersion not set, kind not set" (issue 19).
func TestSamplesApplyWithDashF(t *testing.T) {
	dir := filepath.Join(repoRoot, "config", "samples")
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	strict := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	var names []string
	for _, e := range entries {
		ext := filepath.Ext(e.Name())
		if e.IsDir() || !slices.Contains([]string{".json", ".yaml", ".yml"}, ext) {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		docs := 0
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
		for {
			doc, err := r.Read()
			if err != nil {
				break
			}
			var m map[string]any
			if err := utilyaml.Unmarshal(doc, &m); err == nil && len(m) == 0 {
				continue // only comments
			}
			docs++
			obj, gvk, err := strict.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s: kubectl apply -f reads it as an object, but it does not decode as one: %v", e.Name(), err)
				continue
			}
			vp, ok := obj.(*v1.VolumePair)
			if !ok {
				t.Errorf("%s: a %s, want only VolumePairs in config/samples", e.Name(), gvk)
				continue
			}
			names = append(names, vp.Name)
		}
		if docs == 0 {
			t.Errorf("%s: no object in it", e.Name())
		}
	}
	if len(names) == 0 {
		t.Fatal("no VolumePair in config/samples")
	}

	// What the user types, against the API server.
	ns := newNamespace(t)
	cmd := exec.Command(filepath.Join(repoRoot, "bin", "kubectl"), "--kubeconfig", kubeconfig, "apply", "-n", ns, "-f", "config/samples/")
	cmd.Dir = repoRoot
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err != nil {
		t.Fatalf("kubectl apply -f config/samples/: %v\n%s", err, out)
	}
	for _, n := range names {
		if !strings.Contains(out, "volumepair.storage.tandem.dev/"+n+" created") {
			t.Errorf("kubectl apply -f config/samples/ did not create %s:\n%s", n, out)
		}
	}
}
