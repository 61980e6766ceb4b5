from h import *
MP='application/merge-patch+json'
for (name,addrs,port) in [('n2',[{'type':'InternalIP','address':'127.0.0.1'}],18999),('n3',[{'type':'Hostname','address':'localhost'}],18999),('n4',[{'type':'InternalIP','address':'127.0.0.1'},{'type':'Hostname','address':'localhost'}],18999),('n5',[{'type':'ExternalDNS','address':'localhost'}],18999),('n6',[{'type':'InternalDNS','address':'127.0.0.1.nip.io'}],18999),('n7',[{'type':'InternalIP','address':'0:0:0:0:0:ffff:7f00:1'}],18999),('n8',[{'type':'Hostname','address':'127.0.0.1'}],18999),('n9',[{'type':'Hostname','address':'[::1]'}],18999),('n10',[{'type':'InternalIP','address':'127.1'}],18999), ('n11',[{'type':'Hostname','address':'vm'}],18999)]:
    req('POST','/api/v1/nodes',{'apiVersion':'v1','kind':'Node','metadata':{'name':name},'status':{'addresses':addrs,'daemonEndpoints':{'kubeletEndpoint':{'Port':port}}}})
    req('POST','/api/v1/namespaces/default/pods',{'apiVersion':'v1','kind':'Pod','metadata':{'name':'lp'+name},'spec':{'nodeName':name,'containers':[{'name':'c','image':'x'}]}})
    req('PATCH','/api/v1/namespaces/default/pods/lp%s/status'%name,{'status':{'phase':'Running','containerStatuses':[{'name':'c','image':'x','imageID':'','ready':True,'restartCount':0,'state':{'running':{'startedAt':'2026-12-02T00:00:00Z'}}}]}},MP)
    req('GET','/api/v1/namespaces/default/pods/lp%s/log'%name)
