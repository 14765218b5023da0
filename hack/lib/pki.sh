# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): the cluster's
# credentials (see "API server" in its header). A CA and the API server's
# certificate made with openssl, the service-account key pair, the bearer
# tokens of the --token-auth-file, the agents' shared token, and a kubeconfig
# per user. All of it in .local/pki/ (mode 600) and .local/kube/.

gen_pki() {
  mkdir -p "$PKI"
  local ip
  ip=$(api_ip)
  (
    cd "$PKI" || exit
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=tandem-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,IP:$ip,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
      "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile apiserver.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # Bearer tokens: token,user,uid,"groups"
    {
      echo "$(openssl rand -hex 24),admin,admin,\"system:masters\""
      echo "$(openssl rand -hex 24),tandem-manager,tandem-manager,\"tandem:managers\""
      for n in "${NODES[@]}"; do echo "$(openssl rand -hex 24),tandem-agent:$n,tandem-agent-$n,\"tandem:agents\""; done
      # Real nodes: the kubelets (the Node authorizer knows them by name and
      # group), the controller-manager and the scheduler.
      for n in "${NODES[@]}"; do echo "$(openssl rand -hex 24),system:node:$n,node-$n,\"system:nodes\""; done
      echo "$(openssl rand -hex 24),system:kube-controller-manager,kube-controller-manager"
      echo "$(openssl rand -hex 24),system:kube-scheduler,kube-scheduler"
    } >tokens.csv
    # The API server's client certificate towards the kubelets (logs, exec).
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
    printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >kubelet-client.ext
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 30 -extfile kubelet-client.ext 2>/dev/null
    chmod 600 ./*.key tokens.csv
  )
  # The agents' control API / replication token, shared with the manager.
  openssl rand -hex 24 >"$STATE/agent-token"
  chmod 600 "$STATE/agent-token"
}

token_of() { awk -F, -v u="$1" '$2 == u {print $1}' "$PKI/tokens.csv"; }

write_kubeconfig() { # FILE USER
  local ca
  ca=$(base64 -w0 <"$PKI/ca.crt")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem-local
  cluster:
    server: https://$(api_ip):$API_PORT
    certificate-authority-data: $ca
users:
- name: $2
  user:
    token: $(token_of "$2")
contexts:
- name: tandem-local
  context:
    cluster: tandem-local
    user: $2
    namespace: default
current-context: tandem-local
EOF
  chmod 600 "$1"
}
