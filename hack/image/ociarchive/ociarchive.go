// Package ociarchive builds a single-layer container image from a few local
// files and writes it as one tar archive that both containerd (`ctr images
// import`) and Docker (`docker load`) read:
//
//   - an OCI image layout (oci-layout, index.json, blobs/sha256/...), which
//     containerd prefers; the index entry carries the image's name in the
//     io.containerd.image.name annotation, so `ctr images import` tags it
//     with that name and keeps the manifest, and so its digest, as written;
//   - a docker-save manifest.json naming the same blobs, with RepoTags.
//
// Everything is deterministic: the layer's entries are sorted, owned by
// 0:0, dated at the Unix epoch, and their modes are normalized (0755 for
// directories and executables, 0644 otherwise); the config's dates are the
// epoch too. The same files and settings give the same image digest.
package ociarchive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations of the index entry (see package comment).
const (
	// AnnotationImageName is containerd's full image name annotation.
	AnnotationImageName = "io.containerd.image.name"
	// AnnotationRefName is the OCI reference name annotation (the tag).
	AnnotationRefName = "org.opencontainers.image.ref.name"
)

// epoch is the date of every layer entry and of the config.
var epoch = time.Unix(0, 0).UTC()

// File is one file of the image.
type File struct {
	// Path is the absolute path in the image, e.g. /usr/local/bin/manager.
	Path string
	// Source is the local file whose content is copied. Its mode only
	// decides between 0755 (any execute bit set) and 0644.
	Source string
}

// Spec describes an image.
type Spec struct {
	Files      []File
	User       string // e.g. "65532:65532"
	Entrypoint []string
	Cmd        []string
	Env        []string // KEY=VALUE
	Labels     map[string]string
	OS         string // GOOS, e.g. "linux"
	Arch       string // GOARCH, e.g. "amd64"
	// CreatedBy is recorded in the config's history.
	CreatedBy string
}

// Build returns the image described by spec: one gzip-compressed layer
// with spec.Files and their parent directories, OCI media types.
func Build(spec Spec) (v1.Image, error) {
	if spec.OS == "" || spec.Arch == "" {
		return nil, errors.New("ociarchive: OS and Arch are required")
	}
	layerTar, err := LayerTar(spec.Files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressionLevel(gzip.DefaultCompression), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("ociarchive: layer: %w", err)
	}

	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: spec.CreatedBy},
	})
	if err != nil {
		return nil, fmt.Errorf("ociarchive: append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("ociarchive: config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS = spec.OS
	cf.Architecture = spec.Arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config = v1.Config{
		User:       spec.User,
		Entrypoint: spec.Entrypoint,
		Cmd:        spec.Cmd,
		Env:        spec.Env,
		Labels:     spec.Labels,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("ociarchive: config: %w", err)
	}
	return img, nil
}

// LayerTar returns the uncompressed layer holding files and a directory
// entry (0755) for each of their parents, sorted by path, owned by 0:0 and
// dated at the epoch.
func LayerTar(files []File) ([]byte, error) {
	type entry struct {
		dir    bool
		mode   int64
		source string
	}
	entries := map[string]entry{}
	for _, f := range files {
		p := f.Path
		if !path.IsAbs(p) || path.Clean(p) != p || p == "/" {
			return nil, fmt.Errorf("ociarchive: image path %q: want a clean absolute file path", p)
		}
		rel := strings.TrimPrefix(p, "/")
		if e, ok := entries[rel]; ok {
			if e.dir {
				return nil, fmt.Errorf("ociarchive: %s is both a file and a directory", p)
			}
			return nil, fmt.Errorf("ociarchive: %s given twice", p)
		}
		st, err := os.Stat(f.Source)
		if err != nil {
			return nil, fmt.Errorf("ociarchive: %w", err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("ociarchive: %s is not a regular file", f.Source)
		}
		mode := int64(0o644)
		if st.Mode().Perm()&0o111 != 0 {
			mode = 0o755
		}
		entries[rel] = entry{mode: mode, source: f.Source}
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			if e, ok := entries[d]; ok && !e.dir {
				return nil, fmt.Errorf("ociarchive: /%s is both a file and a directory", d)
			}
			entries[d] = entry{dir: true, mode: 0o755}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	// A parent's path is a prefix of its children's, so it sorts first.
	sort.Strings(names)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		hdr := &tar.Header{Name: n, Mode: e.mode, ModTime: epoch, Uid: 0, Gid: 0}
		if e.dir {
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
			if err := tw.WriteHeader(hdr); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(e.source)
		if err != nil {
			return nil, fmt.Errorf("ociarchive: %w", err)
		}
		hdr.Typeflag = tar.TypeReg
		hdr.Size = int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Reference is an image name split the way containerd and Docker store it.
type Reference struct {
	// Name is the full name, e.g. ghcr.io/tandem-storage/tandem:dev or
	// docker.io/library/busybox:latest (containerd's normalization).
	Name string
	// Tag is the tag alone, e.g. dev.
	Tag string
}

// ParseReference parses an image name with an optional tag (default
// "latest"), no digest. A name without a registry is on docker.io.
func ParseReference(s string) (Reference, error) {
	t, err := name.NewTag(s)
	if err != nil {
		return Reference{}, fmt.Errorf("ociarchive: image name %q: %w", s, err)
	}
	registry := t.RegistryStr()
	if registry == name.DefaultRegistry {
		registry = "docker.io"
	}
	return Reference{
		Name: registry + "/" + t.RepositoryStr() + ":" + t.TagStr(),
		Tag:  t.TagStr(),
	}, nil
}

// Result describes a written archive.
type Result struct {
	// Digest is the image manifest's digest: what `ctr images ls` shows
	// and what a registry would report after a push.
	Digest v1.Hash
	// ConfigDigest is the config's digest (Docker's image ID).
	ConfigDigest v1.Hash
}

// Write writes img as an archive (see the package comment) named ref.
func Write(w io.Writer, ref Reference, img v1.Image) (Result, error) {
	manifest, err := img.RawManifest()
	if err != nil {
		return Result{}, err
	}
	digest, err := img.Digest()
	if err != nil {
		return Result{}, err
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return Result{}, err
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return Result{}, err
	}
	configDigest, err := img.ConfigName()
	if err != nil {
		return Result{}, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return Result{}, err
	}
	layers, err := img.Layers()
	if err != nil {
		return Result{}, err
	}

	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType:   mediaType,
			Size:        int64(len(manifest)),
			Digest:      digest,
			Annotations: map[string]string{AnnotationImageName: ref.Name, AnnotationRefName: ref.Tag},
			Platform:    &v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant},
		}},
	}
	indexJSON, err := json.Marshal(index)
	if err != nil {
		return Result{}, err
	}
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }
	dockerManifest := []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}{{Config: blob(configDigest), RepoTags: []string{ref.Name}}}

	tw := tar.NewWriter(w)
	dir := func(n string) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: n, Mode: 0o755, ModTime: epoch})
	}
	file := func(n string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: size, ModTime: epoch}); err != nil {
			return err
		}
		_, err := io.Copy(tw, r)
		return err
	}
	if err := dir("blobs/"); err != nil {
		return Result{}, err
	}
	if err := dir("blobs/sha256/"); err != nil {
		return Result{}, err
	}
	if err := file(blob(configDigest), int64(len(config)), bytes.NewReader(config)); err != nil {
		return Result{}, err
	}
	written := map[v1.Hash]bool{configDigest: true}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return Result{}, err
		}
		dockerManifest[0].Layers = append(dockerManifest[0].Layers, blob(d))
		if written[d] {
			continue
		}
		written[d] = true
		size, err := l.Size()
		if err != nil {
			return Result{}, err
		}
		rc, err := l.Compressed()
		if err != nil {
			return Result{}, err
		}
		err = file(blob(d), size, rc)
		rc.Close()
		if err != nil {
			return Result{}, fmt.Errorf("ociarchive: layer %s: %w", d, err)
		}
	}
	if err := file(blob(digest), int64(len(manifest)), bytes.NewReader(manifest)); err != nil {
		return Result{}, err
	}
	dockerJSON, err := json.Marshal(dockerManifest)
	if err != nil {
		return Result{}, err
	}
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", indexJSON},
		{"manifest.json", dockerJSON},
	} {
		if err := file(f.name, int64(len(f.data)), bytes.NewReader(f.data)); err != nil {
			return Result{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return Result{}, err
	}
	return Result{Digest: digest, ConfigDigest: configDigest}, nil
}

// WriteFile writes the archive to a temporary file next to out and renames
// it to out, so out is either the old archive or the complete new one.
func WriteFile(out string, ref Reference, img v1.Image) (Result, error) {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return Result{}, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), filepath.Base(out)+".tmp*")
	if err != nil {
		return Result{}, err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	res, err := Write(tmp, ref, img)
	if err != nil {
		tmp.Close()
		return Result{}, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return Result{}, err
	}
	if err := tmp.Close(); err != nil {
		return Result{}, err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return Result{}, err
	}
	return res, nil
}
