#!/usr/bin/env bash
# A blue-green cutover through flow-proxy, with bash and curl only.
#
#   examples/blue-green.sh --service go-demo --from blue --to green \
#     --instance 10.0.0.7:8080 [--instance 10.0.0.8:8080] \
#     --param servicePath=/demo [--param port=8080 …] \
#     [--check-path /demo/] [--expect TEXT] [--host HOST]
#
# 1. deploy:  registers each new instance in Consul as `<service>-<to>` (what Registrator does
#             when the new containers start; skip it with --no-register if they are registered).
# 2. test:    asks each new instance for --check-path directly; any failure stops here and the
#             new instances are deregistered (the old color was never touched).
# 3. switch:  `reconfigure?serviceName=<service>&serviceColor=<to>&<params>`.
# 4. verify:  asks --check-path through the proxy VERIFY_REQUESTS times (default 5): every answer
#             must be 2xx (and contain --expect, when given).
# 5. rollback on failure: `reconfigure` with serviceColor=<from> and the same params, verify the
#             old color answers again, deregister the new instances, exit 1.
# On success the old color's instances are left running for a quick switch back; stop them
# once you are sure.
#
# Environment: FLOW_PROXY_API (default http://127.0.0.1:8080), FLOW_PROXY_URL (HAProxy's
# address, default http://127.0.0.1), CONSUL_HTTP_ADDR (default http://127.0.0.1:8500),
# API_TOKEN (the proxy's bearer token, when it has one), CONSUL_HTTP_TOKEN, VERIFY_REQUESTS.
set -euo pipefail

api=${FLOW_PROXY_API:-http://127.0.0.1:8080}
proxy=${FLOW_PROXY_URL:-http://127.0.0.1}
consul=${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}
[[ $consul == http://* || $consul == https://* ]] || consul="http://$consul"
verify_requests=${VERIFY_REQUESTS:-5}

service='' from='' to='' check_path='/' expect='' host='' register=1
instances=() params=()

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
fail_usage() {
  echo "blue-green: $*" >&2
  usage
}

while (($#)); do
  case $1 in
    --service) service=${2-}; shift 2 ;;
    --from) from=${2-}; shift 2 ;;
    --to) to=${2-}; shift 2 ;;
    --instance) instances+=("${2-}"); shift 2 ;;
    --param) params+=("${2-}"); shift 2 ;;
    --check-path) check_path=${2-}; shift 2 ;;
    --expect) expect=${2-}; shift 2 ;;
    --host) host=${2-}; shift 2 ;;
    --no-register) register=0; shift ;;
    -h | --help) usage ;;
    *) fail_usage "unknown argument $1" ;;
  esac
done

# Names end up in JSON and URLs: the same characters flow-proxy accepts for a service name.
name_pattern='^[A-Za-z0-9][A-Za-z0-9_.-]*$'
[[ $service =~ $name_pattern ]] || fail_usage "--service: give a service name"
[[ $from =~ $name_pattern ]] || fail_usage "--from: give the color serving now"
[[ $to =~ $name_pattern ]] || fail_usage "--to: give the new color"
[[ $from != "$to" ]] || fail_usage "--from and --to are the same color"
((${#instances[@]})) || fail_usage "--instance: give at least one new instance (address:port)"
[[ $check_path == /* ]] || fail_usage "--check-path: give a path starting with /"
[[ $verify_requests =~ ^[1-9][0-9]*$ ]] || fail_usage "VERIFY_REQUESTS: give a positive number"
for instance in "${instances[@]}"; do
  [[ $instance =~ ^[A-Za-z0-9.-]+:[0-9]{1,5}$ ]] || fail_usage "--instance $instance: give address:port"
done
for param in "${params[@]}"; do
  [[ $param == *=* ]] || fail_usage "--param $param: give name=value"
  case ${param%%=*} in
    serviceName | serviceColor) fail_usage "--param ${param%%=*}: set by --service, --from and --to" ;;
  esac
done

log() { echo "blue-green: $*" >&2; }

api_auth=()
[[ -n ${API_TOKEN:-} ]] && api_auth=(-H "Authorization: Bearer $API_TOKEN")
consul_auth=()
[[ -n ${CONSUL_HTTP_TOKEN:-} ]] && consul_auth=(-H "X-Consul-Token: $CONSUL_HTTP_TOKEN")
host_header=()
[[ -n $host ]] && host_header=(-H "Host: $host")

instance_id() { echo "$service-$to-${1//:/-}"; }

deploy() {
  local instance address port
  for instance in "${instances[@]}"; do
    address=${instance%:*} port=$((10#${instance##*:}))
    curl -sS -f --max-time 10 "${consul_auth[@]}" -X PUT "$consul/v1/agent/service/register" \
      -d "{\"ID\":\"$(instance_id "$instance")\",\"Name\":\"$service-$to\",\"Address\":\"$address\",\"Port\":$port}" \
      >/dev/null
    log "registered $instance as $service-$to"
  done
}

undeploy() {
  ((register)) || return 0
  local instance
  for instance in "${instances[@]}"; do
    curl -sS --max-time 10 "${consul_auth[@]}" -X PUT \
      "$consul/v1/agent/service/deregister/$(instance_id "$instance")" >/dev/null ||
      log "could not deregister $instance"
  done
  log "deregistered the $to instances"
}

# Prints the answer's status; fails when it is not 2xx or lacks --expect.
answers_well() {
  local url=$1 body status
  shift
  body=$(curl -sS --max-time 5 "$@" -w '\n%{http_code}' "$url") || return 1
  status=${body##*$'\n'}
  body=${body%$'\n'*}
  if [[ $status != 2?? ]]; then
    log "$url answered $status"
    return 1
  fi
  if [[ -n $expect && $body != *"$expect"* ]]; then
    log "$url answered without \"$expect\": $body"
    return 1
  fi
}

reconfigure() {
  local color=$1
  local args=(--data-urlencode "serviceName=$service" --data-urlencode "serviceColor=$color")
  local param
  for param in "${params[@]}"; do
    args+=(--data-urlencode "$param")
  done
  local answer status
  answer=$(curl -sS --max-time 60 "${api_auth[@]}" -G -w '\n%{http_code}' "${args[@]}" \
    "$api/v1/docker-flow-proxy/reconfigure") || return 1
  status=${answer##*$'\n'}
  if [[ $status != 200 ]]; then
    log "reconfigure serviceColor=$color answered $status: ${answer%$'\n'*}"
    return 1
  fi
  log "the proxy routes $service to $color"
}

verify_through_proxy() {
  local n
  for ((n = 1; n <= verify_requests; n++)); do
    answers_well "$proxy$check_path" "${host_header[@]}" || return 1
  done
  log "$verify_requests requests through the proxy answered well"
}

# 1. deploy
((register)) && deploy

# 2. test the new instances directly
for instance in "${instances[@]}"; do
  if ! answers_well "http://$instance$check_path"; then
    log "$instance fails its direct test: $service stays on $from"
    undeploy
    exit 1
  fi
done
log "the $to instances answer directly"

# 3. switch and 4. verify
if reconfigure "$to" && verify_through_proxy; then
  log "switched $service from $from to $to; stop the $from instances once you are sure"
  exit 0
fi

# 5. roll back
log "rolling $service back to $from"
saved_expect=$expect
expect=''
if ! reconfigure "$from" || ! verify_through_proxy; then
  log "ROLLBACK FAILED: $service does not answer well on $from either; look at it now"
  exit 3
fi
expect=$saved_expect
undeploy
log "rolled back: $service is served by $from"
exit 1
