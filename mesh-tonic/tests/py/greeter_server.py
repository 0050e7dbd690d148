"""A grpcio greeter server for mesh-tonic's interop tests.

Serves helloworld.Greeter on 127.0.0.1 (an ephemeral port), prints `PORT <n>`, and serves
until its stdin closes. Replies name the caller's certificate SANs as grpcio saw them
(`peer=-` without TLS). A name of `busy` is refused with RESOURCE_EXHAUSTED and a pushback.

    greeter_server.py [--ca CA --cert CERT --key KEY [--mtls]]
"""
import argparse
import sys
from concurrent import futures

import grpc

import greeter_pb2
import greeter_pb2_grpc


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request, context):
        if request.name == "busy":
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "100"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        sans = context.auth_context().get("x509_subject_alternative_name") or []
        peer = ",".join(s.decode() for s in sans) or "-"
        return greeter_pb2.HelloReply(
            message=f"Hello {request.name} from python; peer={peer}"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--mtls", action="store_true")
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    if args.cert:
        read = lambda path: open(path, "rb").read()
        creds = grpc.ssl_server_credentials(
            [(read(args.key), read(args.cert))],
            root_certificates=read(args.ca) if args.mtls else None,
            require_client_auth=args.mtls,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("PORT", port, flush=True)
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
